"""A small shop catalogue in raw form, drawn by the package itself (no third-party content).

``write_example_catalogue(out)`` writes what a shop exports before anything is encoded:

* ``interactions.csv``: ``user,item,timestamp`` with string ids (``user_0``, ``SKU007``);
* ``items.csv``: ``item_id,description,image``, one row per item; some descriptions are empty;
* ``images/<item_id>.png``: small drawings (a shape per product kind, a colour per colour word); some items
  have no image (their ``image`` cell is empty);
* ``some-users.txt``: a header line ``user`` and three user ids (a ``--users`` file for ``dgmrec recommend``).

Items come in kinds (mug, lamp, scarf, notebook) and colours; users prefer one or two kinds and pick items of
those kinds far more often, so a recommender has something to learn and item texts and images carry it too.
Everything is deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

KINDS = ("mug", "lamp", "scarf", "notebook")
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 40),
           "black": (30, 30, 30)}
_MATERIALS = {"mug": "stoneware", "lamp": "brushed steel", "scarf": "merino wool", "notebook": "recycled paper"}
_USES = {"mug": "for coffee and tea", "lamp": "for a reading corner", "scarf": "for cold mornings",
         "notebook": "for sketches and lists"}


@dataclass(frozen=True)
class ExampleCatalogue:
    """Paths and counts of a written example catalogue."""

    folder: Path
    interactions: Path
    items: Path
    images: Path
    users: Path
    n_users: int
    n_items: int
    n_interactions: int
    empty_descriptions: tuple[str, ...]
    without_image: tuple[str, ...]


def _draw(kind: str, rgb: tuple[int, int, int], size: int = 48) -> np.ndarray:
    """A ``size x size`` RGB drawing: the product kind's shape in the colour, on a light background."""
    img = np.full((size, size, 3), 245, dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if kind == "mug":  # a disc
        shape = (yy - c) ** 2 + (xx - c) ** 2 <= (0.38 * size) ** 2
    elif kind == "lamp":  # a triangle
        shape = (yy >= 0.15 * size) & (yy <= 0.85 * size) & (np.abs(xx - c) <= (yy - 0.15 * size) * 0.55)
    elif kind == "scarf":  # horizontal stripes
        shape = ((yy // max(1, size // 8)) % 2 == 0) & (yy > 0.1 * size) & (yy < 0.9 * size)
    else:  # notebook: a filled rectangle
        shape = (np.abs(yy - c) <= 0.4 * size) & (np.abs(xx - c) <= 0.28 * size)
    img[shape] = rgb
    return img


def write_example_catalogue(out: str | Path, *, n_users: int = 30, n_items: int = 20, seed: int = 0,
                            empty_descriptions: int = 3, without_image: int = 5) -> ExampleCatalogue:
    """Write the raw example catalogue into ``out`` (created if needed) and describe it.

    ``n_items`` items ``SKU000...`` cycle through the kinds; ``empty_descriptions`` of them get an empty
    description and ``without_image`` others no image. Each of the ``n_users`` users ``user_0...`` picks 8 to
    12 distinct items, 85 % of the time from the one or two kinds they prefer, at increasing timestamps.
    """
    from matplotlib.image import imsave

    folder = Path(out)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"SKU{i:03d}" for i in range(n_items)]
    kinds = [KINDS[i % len(KINDS)] for i in range(n_items)]
    colour_names = list(COLOURS)
    colours = [colour_names[int(rng.integers(len(colour_names)))] for _ in range(n_items)]
    order = rng.permutation(n_items)
    no_text = sorted(ids[i] for i in order[:empty_descriptions])
    no_image = sorted(ids[i] for i in order[empty_descriptions:empty_descriptions + without_image])
    rows = []
    for item, kind, colour in zip(ids, kinds, colours, strict=True):
        text = "" if item in no_text else (f"A {colour} {kind} in {_MATERIALS[kind]}, {_USES[kind]}.")
        image = ""
        if item not in no_image:
            image = f"images/{item}.png"
            imsave(folder / image, _draw(kind, COLOURS[colour]), format="png")
        rows.append({"item_id": item, "description": text, "image": image})
    items_path = folder / "items.csv"
    pd.DataFrame(rows).to_csv(items_path, index=False)

    by_kind = {k: [i for i in range(n_items) if kinds[i] == k] for k in KINDS}
    inter = []
    start = 1_700_000_000
    for u in range(n_users):
        liked = rng.choice(len(KINDS), size=int(rng.integers(1, 3)), replace=False)
        preferred = [i for k in liked for i in by_kind[KINDS[int(k)]]]
        others = [i for i in range(n_items) if i not in preferred]
        count = min(n_items, int(rng.integers(8, 13)))
        picked: list[int] = []
        while len(picked) < count:
            pool = preferred if (rng.random() < 0.85 or not others) else others
            pool = [i for i in pool if i not in picked] or [i for i in range(n_items) if i not in picked]
            picked.append(int(rng.choice(pool)))
        t = start + int(rng.integers(0, 86_400))
        for i in picked:
            t += int(rng.integers(600, 86_400))
            inter.append({"user": f"user_{u}", "item": ids[i], "timestamp": t})
    inter_path = folder / "interactions.csv"
    pd.DataFrame(inter).to_csv(inter_path, index=False)
    users_path = folder / "some-users.txt"
    users_path.write_text("user\n" + "".join(f"user_{u}\n" for u in range(0, n_users, max(1, n_users // 3))[:3]))
    return ExampleCatalogue(folder=folder, interactions=inter_path, items=items_path, images=images,
                            users=users_path, n_users=n_users, n_items=n_items, n_interactions=len(inter),
                            empty_descriptions=tuple(no_text), without_image=tuple(no_image))
