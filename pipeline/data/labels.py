"""Where a sample's class label comes from (``data.label_key`` / ``prepare --label-key``), read by one rule for
the data module and for ``genbench prepare --from``, so a corpus trained on directly and its re-sharded copy see
the same labels.

The rule: no label entry, or a ``.json`` without the attribute, is an unlabelled sample; an integer, or a
string of digits in any entry, is a class index; any other string is a class name (the data module looks it up
in the manifest's ``class_names``, ``prepare --from`` numbers names in the order they first appear).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Union


def parse_label_key(label_key: str) -> tuple[str, Optional[str]]:
    """``cls`` | ``json:ATTRIBUTE`` | ``txt`` -> (entry, attribute)."""
    entry, _, attribute = label_key.partition(":")
    if entry == "json" and attribute:
        return entry, attribute
    if entry in ("cls", "txt") and not attribute:
        return entry, None
    raise ValueError(f"data.label_key={label_key!r}: use cls, json:ATTRIBUTE (e.g. json:label) or txt (matched "
                     "against the class names)")


def read_label(sample: Mapping[str, Any], entry: str, attribute: Optional[str]) -> Union[int, str, None]:
    """A sample's label as its shard holds it: a class index, a class name, or None (unlabelled).

    Raises ValueError for a label that is neither (a float, a list, an empty string).
    """
    if entry not in sample:
        return None
    raw = sample[entry]
    if entry == "json":
        attributes = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
        if not isinstance(attributes, dict) or attribute not in attributes:
            return None
        value = attributes[attribute]
    else:
        value = raw.decode("utf-8").strip() if isinstance(raw, (bytes, bytearray)) else str(raw).strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value:
        return int(value) if value.lstrip("-").isdigit() else value
    raise ValueError(f"label {value!r} ({entry}{':' + attribute if attribute else ''}) is neither a class index "
                     "nor a class name")
