"""`data.caption_template`, its one home: how a caption is filled in (`fill_caption`, for training, the doctor and
the cache keys) and what a template may hold (`template_problem`, for the config's check at load)."""

from __future__ import annotations

import re
import string


def fill_caption(template: str, caption: str, trigger: str) -> str:
    """The text the encoder gets: {caption} and {trigger} (the trigger word, or "") filled in, ends stripped."""
    return template.format(caption=caption, trigger=trigger).strip()


def template_problem(template: str, trigger: str) -> str | None:
    """Why `template` cannot make captions: no {caption}, a placeholder other than {caption} and {trigger} (an index
    such as {trigger[0]} is fine), an attribute or a format spec (`{trigger.title}` trained a method's repr, a spec
    holding the caption failed on real captions only), or a brace that does not pair."""
    if "{caption}" not in template:
        return "no {caption}"
    try:
        for _, name, spec, conversion in string.Formatter().parse(template):
            if name is None:
                continue
            root = re.split(r"[.\[]", name, maxsplit=1)[0]
            if root not in ("caption", "trigger"):
                return f"unknown placeholder {{{name}}}"
            if "." in name or spec or conversion:
                return f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is more than a placeholder"
        fill_caption(template, "a caption", trigger)
    except (KeyError, IndexError, ValueError) as e:
        return f"not a template ({e})"
    return None
