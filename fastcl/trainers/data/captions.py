"""Captions for images that come with class labels only (the CLIP and PS3 stand-ins).

No image-caption pairs are available offline, so captions are generated from the class:

* CLIP (:func:`clip_captions`): ``template.format(noun=..., attribute=...)`` over the
  :data:`TEMPLATES` below, a class noun drawn from the class's synonyms and an attribute word
  drawn from the class's attribute list (:data:`FASHION_DESCRIPTIONS` for Fashion-MNIST;
  generic ones for digits and the synthetic patterns). Every (template, noun, attribute)
  combination is one caption string; a training image gets one of its class's captions at
  random each time it is drawn.
* Zero-shot prompts (:func:`class_prompts`): ``"a photo of a {class name}"``, one per class,
  which is the caption form CLIP evaluates with; the class's first synonym is its name.
* PS3 region captions (:func:`region_caption`): ``"a sneaker at the top left"``, where the
  region is the cell of a 3 x 3 grid holding the box's centre.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

#: Caption templates; ``{noun}`` is a class synonym, ``{attribute}`` an attribute word.
TEMPLATES = (
    "a photo of a {attribute} {noun}",
    "a grayscale picture of a {noun}, {attribute}",
    "a {attribute} {noun}",
    "a product shot of a {attribute} {noun}",
    "a small image of a {noun} that looks {attribute}",
    "this is a {noun}",
)

#: Per Fashion-MNIST class: (synonyms, attribute words). The first synonym is the class name.
FASHION_DESCRIPTIONS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "t-shirt": (("t-shirt", "tee", "short-sleeved top"), ("cotton", "casual", "plain", "printed")),
    "trouser": (("trouser", "pair of trousers", "pair of pants"), ("long", "slim", "straight-leg", "casual")),
    "pullover": (("pullover", "sweater", "jumper"), ("knitted", "warm", "long-sleeved", "woollen")),
    "dress": (("dress", "gown", "frock"), ("summer", "elegant", "sleeveless", "long")),
    "coat": (("coat", "jacket", "overcoat"), ("warm", "buttoned", "winter", "heavy")),
    "sandal": (("sandal", "summer sandal", "strappy sandal"), ("open", "flat", "light", "strappy")),
    "shirt": (("shirt", "button-up shirt", "blouse"), ("collared", "formal", "long-sleeved", "checked")),
    "sneaker": (("sneaker", "trainer", "running shoe"), ("sporty", "low-top", "lace-up", "white")),
    "bag": (("bag", "handbag", "purse"), ("leather", "large", "shoulder", "square")),
    "ankle boot": (("ankle boot", "boot", "short boot"), ("leather", "heeled", "winter", "sturdy")),
}

_GENERIC_ATTRIBUTES = ("small", "centred", "bright", "clear")

#: 3 x 3 grid of regions: (row, column) -> the phrase after the noun.
REGION_PHRASES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}


def describe(class_names: Sequence[str]) -> List[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """(synonyms, attributes) per class: the Fashion-MNIST table, else the name with generic
    attributes (digits: "handwritten", synthetic patterns: "noisy" ...)."""
    out = []
    for name in class_names:
        if name in FASHION_DESCRIPTIONS:
            out.append(FASHION_DESCRIPTIONS[name])
        else:
            out.append(((name, f"{name} shape"), _GENERIC_ATTRIBUTES))
    return out


def clip_captions(class_names: Sequence[str]) -> Tuple[List[str], List[List[int]]]:
    """All generated captions and, per class, the ids of its captions.

    Returns ``(captions, ids_per_class)``: ``captions`` a list of distinct strings (the classes'
    captions in class order), ``ids_per_class[c]`` the indices of class c's captions in it.
    """
    captions, per_class, seen = [], [], {}
    for synonyms, attributes in describe(class_names):
        ids = []
        for template in TEMPLATES:
            for noun in synonyms:
                for attribute in (attributes if "{attribute}" in template else attributes[:1]):
                    text = template.format(noun=noun, attribute=attribute)
                    if text not in seen:
                        seen[text] = len(captions)
                        captions.append(text)
                    if seen[text] not in ids:
                        ids.append(seen[text])
        per_class.append(ids)
    return captions, per_class


def class_prompts(class_names: Sequence[str]) -> List[str]:
    """Zero-shot prompts, one per class: ``"a photo of a {name}"``."""
    return [f"a photo of a {name}" for name in class_names]


def sample_caption_ids(labels: torch.Tensor, ids_per_class: Sequence[Sequence[int]],
                       generator: torch.Generator = None) -> torch.Tensor:
    """One caption id per label, uniformly among its class's captions."""
    counts = torch.tensor([len(ids) for ids in ids_per_class])
    table = torch.full((len(ids_per_class), int(counts.max())), -1, dtype=torch.int64)
    for c, ids in enumerate(ids_per_class):
        table[c, :len(ids)] = torch.tensor(ids)
    pick = (torch.rand(labels.shape, generator=generator) * counts[labels]).long()
    return table[labels, pick]


def region_of(box: Sequence[int], side: int) -> Tuple[int, int]:
    """(row, column) of the 3 x 3 grid cell holding the centre of ``box`` = (top, left, bottom, right)."""
    centre_y, centre_x = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(2, int(3 * centre_y / side)), min(2, int(3 * centre_x / side))


def region_caption(class_name: str, box: Sequence[int], side: int) -> str:
    """``"a {class_name} {region phrase}"``, e.g. ``"a sneaker at the top left"``."""
    return f"a {class_name} {REGION_PHRASES[region_of(box, side)]}"


def all_region_captions(class_names: Sequence[str]) -> List[str]:
    """Every region caption, class-major: id = class * 9 + row * 3 + column."""
    return [f"a {name} {REGION_PHRASES[(row, col)]}" for name in class_names for row in range(3) for col in range(3)]


def region_caption_id(label: int, box: Sequence[int], side: int) -> int:
    row, col = region_of(box, side)
    return int(label) * 9 + row * 3 + col
