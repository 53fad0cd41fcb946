"""The data doctor's report: findings, exclusions and buckets, printed as a table, a one-line summary, JSON
(`doctor.json`, where `prepare` and training find the verdicts) and an HTML contact sheet of edit pairs.
`past_verdicts` reads those verdicts back for training.

Verdicts live in `verdicts_dir(cfg)`: `<cache_dir>/verdicts/<data name>-<digest>/` (doctor.json, prepare-r*.json,
edit_pairs.html), the digest over the data source (symbolic links resolved) and every setting a verdict depends on.
Data sets (or settings) sharing one cache never read each other's verdicts, and a later run on the same data, in any
output_dir or through a link, finds them.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from qwen_image_lora.config import Config
from qwen_image_lora.console import counted
from qwen_image_lora.data.buckets import histogram
from qwen_image_lora.io import atomic_write_text

GROUP_AT = 4  # a code found on this many items or more is printed as one line with a count and examples
EXAMPLES = 3
# What decides an item's verdict besides its files: how items are listed, how pixels and captions are made, the
# doctor's limits, the buckets (prepare's plan) and the model (its tokenizer counts caption tokens).
VERDICT_DATA = (
    "path", "format", "columns", "split", "alpha", "background", "trigger_word", "caption_template",
    "resolution", "max_upscale", "min_side", "max_aspect", "max_megapixels", "max_caption_tokens",
)  # fmt: skip
VERDICT_MODEL = ("pretrained", "revision")


@dataclass
class Finding:
    severity: str  # "error" (item excluded) or "warning" (kept)
    code: str
    item: str  # item id ("" for data-set level findings)
    message: str
    path: str | None = None


@dataclass
class Report:
    data_path: str
    n_items: int
    findings: list[Finding] = field(default_factory=list)
    excluded: dict[str, list[str]] = field(default_factory=dict)  # item id -> error codes
    buckets: Counter = field(default_factory=Counter)  # (w, h) of clean targets -> count
    pairs: list[dict] = field(default_factory=list)  # edit rows for the contact sheet (thumbnails inline)
    judged: dict[str, str] = field(default_factory=dict)  # item id -> fingerprint of what was checked

    def add(self, severity: str, code: str, item: str, message: str, path=None) -> None:
        self.findings.append(Finding(severity, code, item, message, str(path) if path else None))
        if severity == "error" and code not in self.excluded.setdefault(item, []):
            self.excluded[item].append(code)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def n_clean(self) -> int:
        return self.n_items - len(self.excluded)

    def codes(self) -> Counter:
        return Counter(f.code for f in self.findings)

    def to_dict(self) -> dict:
        return {
            "data_path": self.data_path,
            "summary": {
                "items": self.n_items,
                "clean": self.n_clean,
                "excluded": len(self.excluded),
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "by_code": dict(self.codes()),
            },
            "excluded": self.excluded,
            "findings": [asdict(f) for f in self.findings],
            "buckets": [{"size": list(b), "count": n} for b, n in self.buckets.most_common()],
            "judged": self.judged,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        """The report `to_dict` wrote (without the contact sheet's rows)."""
        return cls(
            data["data_path"],
            data["summary"]["items"],
            [Finding(**f) for f in data["findings"]],
            data["excluded"],
            Counter({tuple(b["size"]): b["count"] for b in data["buckets"]}),
            judged=data["judged"],
        )

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    def summary(self) -> str:
        """One line: items, clean, excluded, and the findings by code."""
        codes = ", ".join(f"{c} {n}" for c, n in self.codes().most_common())
        return (
            f"{counted(self.n_items, 'item')}: {self.n_clean} clean, {len(self.excluded)} excluded; "
            f"{counted(len(self.errors), 'error')}, {counted(len(self.warnings), 'warning')}{' (' + codes + ')' if codes else ''}"
        )

    def _rows(self) -> list[tuple[str, str, str, str]]:
        """(severity, code, item, message), errors first; a code on GROUP_AT+ items becomes one grouped row."""
        groups: dict[tuple[str, str], list[Finding]] = defaultdict(list)
        for f in sorted(self.findings, key=lambda f: (f.severity != "error", f.code, f.item)):
            groups[(f.severity, f.code)].append(f)
        rows = []
        for (severity, code), found in groups.items():
            items = list(dict.fromkeys(f.item for f in found))  # an item may hold a code more than once (captions)
            if len(items) < GROUP_AT:
                rows += [(severity, code, f.item, f.message) for f in found]
                continue
            examples = ", ".join(items[:EXAMPLES])
            rows.append(
                (severity, code, f"{len(items)} items", f"e.g. {examples}, ...; {found[0].item}: {found[0].message}")
            )
        return rows

    def table(self, limit: int = 60) -> str:
        """The findings as a fixed-width table (errors first, repeated codes grouped), the summary and the
        bucket histogram."""
        rows = self._rows()
        lines = []
        if rows:
            w_item = min(40, max(4, *(len(r[2]) for r in rows)))
            w_code = max(4, *(len(r[1]) for r in rows))
            lines.append(f"{'severity':<8}  {'code':<{w_code}}  {'item':<{w_item}}  message")
            lines.append("-" * (8 + w_code + w_item + 40))
            for severity, code, item, message in rows[:limit]:
                item = item if len(item) <= w_item else "..." + item[-(w_item - 3) :]
                lines.append(f"{severity:<8}  {code:<{w_code}}  {item:<{w_item}}  {message}")
            if len(rows) > limit:
                lines.append(f"... {len(rows) - limit} more rows in the JSON report")
        else:
            lines.append("no problems found")
        lines.append("\n" + self.summary())
        if self.buckets:
            lines.append(f"buckets (clean targets):\n{histogram(list(self.buckets.elements()))}")
        return "\n".join(lines)

    def write_html(self, path: str | Path) -> None:
        """A contact sheet of the edit pairs: sources | target | instruction, flagged rows marked."""
        rows = []
        for p in self.pairs:
            flags = p["flags"]
            cls = "error" if p["excluded"] else ("flag" if flags else "")
            srcs = "".join(f'<img src="{s}">' for s in p["sources"])
            tgt = f'<img src="{p["target"]}">' if p["target"] else "(unreadable)"
            note = "<br>".join(html.escape(f) for f in flags)
            rows.append(
                f'<tr class="{cls}"><td>{html.escape(p["id"])}</td><td>{srcs}</td><td>{tgt}</td>'
                f"<td>{html.escape(p['instruction'])}</td><td>{note}</td></tr>"
            )
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>data doctor: edit pairs</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td{{border:1px solid #ccc;padding:4px;vertical-align:top}}
img{{max-width:160px;max-height:160px;margin:2px}} tr.flag{{background:#fff3cd}} tr.error{{background:#f8d7da}}</style></head>
<body><h1>Edit pairs ({len(self.pairs)}; {sum(1 for p in self.pairs if p["flags"])} flagged)</h1>
<p>{html.escape(self.data_path)}. Yellow: warnings; red: excluded.</p>
<table><tr><th>item</th><th>sources</th><th>target</th><th>instruction</th><th>flags</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
        atomic_write_text(path, page)


def thumbnail(image: Image.Image, side: int = 160) -> str:
    """A data: URL of a small copy, for the contact sheet."""
    im = image.copy()
    im.thumbnail((side, side))
    buf = io.BytesIO()
    if im.mode == "RGBA":
        im.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    im.convert("RGB").save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def verdicts_dir(cfg: Config) -> Path | None:
    """Where the doctor's and prepare's verdicts on `cfg.data` live (see the module docstring); None without a cache."""
    if not cfg.data.cache_dir:
        return None
    settings = {"data": {k: getattr(cfg.data, k) for k in VERDICT_DATA}}
    settings["data"]["path"] = source_id(cfg.data.path)
    settings["model"] = {k: getattr(cfg.model, k) for k in VERDICT_MODEL}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^\w.-]+", "_", Path(source_id(cfg.data.path)).name)[:40]  # only to help a reader find their data
    return Path(cfg.data.cache_dir) / "verdicts" / f"{name}-{digest}"


def source_id(data_path) -> str:
    """`data.path` as verdicts are filed under: a local path with its symbolic links resolved, so a data set reached
    through a link finds its verdicts (item files are resolved already); anything else (a hub dataset id) as given."""
    if not data_path:
        return str(data_path)
    path = Path(str(data_path))
    return str(path.resolve()) if path.exists() else str(data_path)


def read_report(path: str | Path) -> Report | None:
    """A report written by `write_json`; None when it is missing or unreadable."""
    try:
        return Report.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def past_verdicts(folder: str | Path | None, data_path: str | None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(judged, excluded) for the data at `data_path`, from `folder` (`verdicts_dir`): the fingerprints of the items
    the last doctor run judged (`doctor.json`), and the items to leave out: those it excluded plus those `prepare`
    failed to encode (`prepare-r*.json`), while the item under that id is the one that failed."""
    judged: dict[str, str] = {}
    excluded: dict[str, list[str]] = {}
    if not folder or not Path(folder).is_dir():
        return judged, excluded
    for path in [Path(folder) / "doctor.json", *sorted(Path(folder).glob("prepare-r*.json"))]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if source_id(data.get("data_path")) != source_id(data_path):
            continue
        judged.update(data.get("judged", {}))
        states = data.get("fingerprints", {})  # prepare's: the state of each item it failed on
        for item_id, codes in data.get("excluded", {}).items():
            if item_id in states:
                if judged.get(item_id, states[item_id]) != states[item_id]:
                    continue  # the doctor has judged another item (or state) under this id since: a row deleted
                judged.setdefault(item_id, states[item_id])  # above a failed one moved a good one to its line
            excluded.setdefault(item_id, []).extend(codes)
    return judged, excluded
