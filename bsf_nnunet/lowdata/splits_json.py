"""``splits_final.json`` as text: nnU-Net's own folds kept byte for byte, the low-data folds appended after them in
the format of nnU-Net's ``save_json`` (so a file nnU-Net wrote reads as if it had written the whole list)."""
from __future__ import annotations

import json
from typing import List


def _element_spans(text: str, path: str):
    """(start, end) character offsets of the elements of the top-level JSON array in ``text``."""
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:i + 1] == "[":
        raise ValueError(f"{path} is not a JSON list of folds. Fix or delete it (nnU-Net re-creates its 5 folds).")
    i += 1
    spans = []
    ws = " \t\r\n"
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if text[i:i + 1] == "]":
            return spans
        _, end = dec.raw_decode(text, i)
        spans.append((i, end))
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if text[i:i + 1] == ",":
            i += 1


def _fold_text(fold: dict) -> str:
    """One fold as nnU-Net's save_json writes list elements (indent 4, sorted keys)."""
    return "\n".join("    " + line for line in json.dumps(fold, indent=4, sort_keys=True).splitlines())


def splits_text(base_text: str, base_folds: List[dict], new_folds: List[dict], path: str) -> str:
    """The split file: ``base_folds`` exactly as they are in ``base_text`` (their first len(base_folds) elements),
    then ``new_folds``.

    For a file written by nnU-Net (``save_json``: indent 4, sorted keys) the result equals what ``save_json`` would
    write for the whole list.
    """
    if not base_folds:
        head, sep = "[", "\n"
    else:
        head, sep = base_text[:_element_spans(base_text, path)[len(base_folds) - 1][1]], ",\n"
    if not new_folds:
        return head + ("\n]" if base_folds else "]")
    return head + sep + ",\n".join(_fold_text(f) for f in new_folds) + "\n]"
