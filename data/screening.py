"""What training leaves out before it plans buckets: what the data doctor would, whatever state its verdicts are in.

    keep, skipped = screen_items(items, cfg, tokenizer)

The doctor's last verdicts (`report.past_verdicts`, filed per data set and settings) hold for the items it judged in
their current state. Every other item (none judged: no doctor run, other settings, no cache; a file added or changed
since) gets the doctor's per-item checks (`doctor.check_item`) here, and the kept items get its exact-copy check
(`similarity.exclude_copies`: same rule, same words), so a copy is never trained twice. The checks that compare
images (near-duplicates, edit pairs) stay the doctor's: they read every image and are worth a run of their own.
"""

from __future__ import annotations

import logging
from collections import Counter

from qwen_image_lora.config import Config
from qwen_image_lora.data import similarity as sim
from qwen_image_lora.data.doctor import check_item, fingerprint
from qwen_image_lora.data.report import Report, past_verdicts, verdicts_dir
from qwen_image_lora.data.sources import Item
from qwen_image_lora.io import content_hash

logger = logging.getLogger(__name__)
SAID_ONE_BY_ONE = 10


def screen_items(items: list[Item], cfg: Config, tokenizer) -> tuple[list[Item], list[tuple[Item, str]]]:
    """(items to train on, skipped items with the reason). Each item skipped here gets one warning naming it and
    why; one whose content its extension misnames (a GIF named .png) is kept with a warning saying what it is."""
    judged, excluded = past_verdicts(verdicts_dir(cfg), cfg.data.path)
    keep, skipped, by_doctor, unjudged, rechecked = [], [], [], 0, set()
    content: dict[str, tuple[str, ...]] = {}  # item id -> sha256 of its target and sources, from the checks' read
    report = Report(str(cfg.data.path), 0)
    for item in items:
        fresh = item.id in judged and judged[item.id] == fingerprint(item)
        if fresh and excluded.get(item.id) == ["duplicate"]:
            # A verdict on a pair: with the kept original deleted or retouched since, the copy trained zero times.
            rechecked.add(item.id)  # compared again below with what is kept now
            keep.append(item)
            continue
        if item.id in excluded and (fresh or item.id not in judged):
            by_doctor.append(item)
            codes = excluded[item.id]
            judge = "`data prepare`" if all(c.startswith("prepare-failed") for c in codes) else "the data doctor"
            skipped.append((item, f"excluded by {judge}: " + ", ".join(codes)))
            continue
        if not fresh:
            unjudged += 1
            target, _, sources = check_item(item, cfg, tokenizer, report)
            if item.id in report.excluded:
                _skip(item, report, skipped)
                continue
            content[item.id] = (target.sha256, *(info.sha256 for info, _ in sources))
            for f in report.findings:  # kept, as the doctor keeps it, but not trained on silently
                if f.item == item.id and f.code == "extension-mismatch":
                    logger.warning("training %s, %s", item.id, f.message)
        keep.append(item)
    if content or rechecked:  # an item the doctor has not judged may copy any other: compare all that are kept
        keep = _drop_copies(keep, content, report, skipped)
        by_doctor += [item for item, _ in skipped if item.id in rechecked]  # still its copy: the doctor said so
    if unjudged:
        logger.info(
            "%d of %d items not judged by the data doctor at these settings: checked one by one and for exact copies "
            "here; `qwen-lora data doctor` also finds near-duplicates and edit-pair problems",
            unjudged,
            len(items),
        )
    doctors = {item.id for item in by_doctor}
    say_skipped([(item, reason) for item, reason in skipped if item.id not in doctors])
    if by_doctor:  # the doctor already printed these; one line here
        logger.info(
            "%d items left out as the data doctor or `data prepare` excluded them (e.g. %s); see %s",
            len(by_doctor),
            ", ".join(it.id for it in by_doctor[:3]),
            verdicts_dir(cfg),
        )
    return keep, skipped


def _skip(item: Item, report: Report, skipped: list) -> None:
    reason = "; ".join(f"{f.code}: {f.message}" for f in report.findings if f.item == item.id and f.severity == "error")
    skipped.append((item, reason))


def reason_code(reason: str) -> str:
    """A skip reason's code: `empty-file: ...`, or the doctor's first code in `excluded by the data doctor: ...`."""
    head, _, rest = reason.partition(": ")
    return rest.split(",")[0].strip() if head.startswith("excluded by") else head


def say_skipped(skipped: list[tuple[Item, str]]) -> None:
    """A warning per skipped item up to SAID_ONE_BY_ONE, then one line counting the rest by reason: a folder of 500
    uncaptioned images printed 500 lines, where the doctor groups them."""
    for item, reason in skipped[:SAID_ONE_BY_ONE]:
        logger.warning("skipping %s: %s", item.id, reason)
    rest = skipped[SAID_ONE_BY_ONE:]
    if rest:
        counts = Counter(reason_code(reason) for _, reason in rest)
        by_reason = ", ".join(f"{n} {code}" for code, n in counts.most_common())
        logger.warning("skipping %d more items (%s); `qwen-lora data doctor` lists them", len(rest), by_reason)


def _drop_copies(keep: list[Item], content: dict, report: Report, skipped: list) -> list[Item]:
    """`keep` without the exact copies the doctor would exclude. The doctor's verdicts cover the items it judged, so
    only their hashes are new reads; training hashes the same files for its cache keys (memoised)."""
    images = []
    for item in keep:
        try:
            hashes = content.get(item.id) or tuple(content_hash(p) for p in (item.target, *item.sources))
        except OSError:  # gone since it was listed: planning names it
            continue
        images.append({"id": item.id, "path": item.target, "content": hashes, "captions": item.captions})
    sim.exclude_copies(images, report.add)
    copies = {item.id for item in keep if "duplicate" in report.excluded.get(item.id, [])}
    for item in keep:
        if item.id in copies:
            _skip(item, report, skipped)
    return [item for item in keep if item.id not in copies]
