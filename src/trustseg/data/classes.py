"""Class metadata of the supported datasets and the maps from on-disk label values to class ids.

Each dataset stores labels its own way (CamVid's void 11, ADE20K's 0 = "other", Cityscapes' 34 label
ids). A :class:`LabelMap` turns a raw mask into the internal convention once, on load: class ids
``0..K-1`` and the ignore label (255, or 65535 above 255 classes: ``ignore_index_for``) for pixels
that count nowhere; any other value is a user error that names the mask file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from trustseg.data.base import IGNORE_INDEX, ClassInfo, ignore_index_for
from trustseg.errors import UserError

Color = tuple[int, int, int]


def bit_palette(num_classes: int) -> tuple[Color, ...]:
    """The PASCAL VOC colour map: the bits of the class id are spread over R, G, B, high bits first.

    Gives distinct colours for up to 256 classes, with class 0 black; used for VOC itself and for
    datasets that ship no palette of their own.
    """
    colours = []
    for class_id in range(num_classes):
        rgb = [0, 0, 0]
        bits = class_id
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        colours.append((rgb[0], rgb[1], rgb[2]))
    return tuple(colours)


def _hex_palette(text: str) -> tuple[Color, ...]:
    return tuple((int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)) for h in text.split())


# --- CamVid (SegNet 11-class version; colours from SegNet-Tutorial's test script) -----------------
CAMVID = ClassInfo(
    names=("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
           "Pedestrian", "Bicyclist"),
    palette=((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
             (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)),
)
CAMVID_VOID = 11

# --- Cityscapes (19 evaluation classes of the official labels.py) -----------------------------------
CITYSCAPES = ClassInfo(
    names=("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
           "motorcycle", "bicycle"),
    palette=((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
             (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
             (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
             (0, 80, 100), (0, 0, 230), (119, 11, 32)),
)
# label id (gtFine_labelIds.png) -> train id; every id not listed is ignored
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# --- ADE20K (SceneParsing ADEChallengeData2016, 150 classes; raw 0 = "other" is ignored) -----------
ADE20K = ClassInfo(
    names=(
        "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
        "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
        "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
        "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
        "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
        "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
        "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
        "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
        "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
        "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
        "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
        "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
        "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
        "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
        "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
        "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
        "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
        "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
    ),
    # the colour table used by the community toolkits (mmsegmentation), as RRGGBB
    palette=_hex_palette("""
        787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07
        e005ff ebff07 96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603
        0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff
        08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207
        ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f
        14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff
        0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00
        008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff
        ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2
        00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000
        8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff
        00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3
        ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00
        00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff
        4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff
    """),
)

# --- PASCAL VOC 2012 (20 objects + background; 255 marks object borders) --------------------------
VOC = ClassInfo(
    names=("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
           "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
           "sheep", "sofa", "train", "tvmonitor"),
    palette=bit_palette(21),
)

# --- FoodSeg103 (category_id.txt of the official release: 0 background + 103 ingredients) ---------
# The release defines no colours, so the VOC colour map stands in.
_FOODSEG103_NAMES = (
    "background", "candy", "egg tart", "french fries", "chocolate", "biscuit", "popcorn", "pudding",
    "ice cream", "cheese butter", "cake", "wine", "milkshake", "coffee", "juice", "milk", "tea",
    "almond", "red beans", "cashew", "dried cranberries", "soy", "walnut", "peanut", "egg", "apple",
    "date", "apricot", "avocado", "banana", "strawberry", "cherry", "blueberry", "raspberry",
    "mango", "olives", "peach", "lemon", "pear", "fig", "pineapple", "grape", "kiwi", "melon",
    "orange", "watermelon", "steak", "pork", "chicken duck", "sausage", "fried meat", "lamb",
    "sauce", "crab", "fish", "shellfish", "shrimp", "soup", "bread", "corn", "hamburg", "pizza",
    "hanamaki baozi", "wonton dumplings", "pasta", "noodles", "rice", "pie", "tofu", "eggplant",
    "potato", "garlic", "cauliflower", "tomato", "kelp", "seaweed", "spring onion", "rape",
    "ginger", "okra", "lettuce", "pumpkin", "cucumber", "white radish", "carrot", "asparagus",
    "bamboo shoots", "broccoli", "celery stick", "cilantro mint", "snow peas", "cabbage",
    "bean sprouts", "onion", "pepper", "green beans", "French beans", "king oyster mushroom",
    "shiitake", "enoki mushroom", "oyster mushroom", "white button mushroom", "salad",
    "other ingredients",
)
FOODSEG103 = ClassInfo(names=_FOODSEG103_NAMES, palette=bit_palette(len(_FOODSEG103_NAMES)))


def generic_classes(names: Iterable[str]) -> ClassInfo:
    """ClassInfo for user data: the given names, coloured with the VOC colour map."""
    names = tuple(names)
    return ClassInfo(names=names, palette=bit_palette(len(names)))


def format_values(values: Iterable[int], limit: int = 12) -> str:
    values = sorted(set(values))
    shown = ", ".join(str(v) for v in values[:limit])
    more = f", ... ({len(values)} values)" if len(values) > limit else ""
    return "{" + shown + more + "}"


@dataclass(frozen=True, eq=False)
class LabelMap:
    """Raw mask value -> class id via a lookup table; table entries of -1 are values that must not occur.

    The table covers at least the 256 values of an 8-bit mask (all 65536 of a 16-bit one above 255
    classes); ``beyond`` is what larger raw values become (-1: not allowed). Ignored values become
    ``ignore_index_for(num_classes)``. ``expected`` describes the valid raw values for error messages;
    ``suggest_reduce_zero`` adds the reduce_zero_label hint when a mask holds exactly the value
    ``num_classes`` (ADE-style labels 0..K).
    """

    table: np.ndarray  # int64 (V,), V >= 256
    num_classes: int
    expected: str
    beyond: int = -1
    suggest_reduce_zero: bool = False

    @property
    def ignore_index(self) -> int:
        return ignore_index_for(self.num_classes)

    @classmethod
    def _empty(cls, fill: int, largest_raw: int) -> np.ndarray:
        return np.full(max(IGNORE_INDEX, largest_raw) + 1, fill, dtype=np.int64)

    @classmethod
    def identity(cls, num_classes: int, *, ignore: Iterable[int] | None = None,
                 suggest_reduce_zero: bool = False) -> LabelMap:
        """Raw value k is class k for k < num_classes; values in ``ignore`` (default: the ignore label
        of ``num_classes`` classes) are ignored."""
        ignore = (ignore_index_for(num_classes),) if ignore is None else tuple(ignore)
        table = cls._empty(-1, max(num_classes - 1, *ignore))
        table[:num_classes] = np.arange(num_classes)
        table[list(ignore)] = ignore_index_for(num_classes)
        ignored = " and ".join(str(v) for v in ignore)
        return cls(table, num_classes, f"0..{num_classes - 1}, or {ignored} for ignore",
                   suggest_reduce_zero=suggest_reduce_zero)

    @classmethod
    def reduce_zero(cls, num_classes: int) -> LabelMap:
        """Raw 0 is ignored and raw k in 1..num_classes is class k-1 (ADE20K); the largest value of
        the raw mask dtype (255, or 65535 when raw labels reach 255) stays ignored."""
        raw_ignore = ignore_index_for(num_classes + 1)
        table = cls._empty(-1, raw_ignore)
        table[[0, raw_ignore]] = ignore_index_for(num_classes)
        table[1:num_classes + 1] = np.arange(num_classes)
        return cls(table, num_classes, f"0 (ignored), 1..{num_classes} or {raw_ignore} with reduce_zero_label")

    @classmethod
    def from_table(cls, mapping: Mapping[int, int], num_classes: int) -> LabelMap:
        """Raw values listed in ``mapping`` become their class id; every other value is ignored."""
        ignore = ignore_index_for(num_classes)
        table = cls._empty(ignore, max(mapping))
        for raw, class_id in mapping.items():
            table[raw] = class_id
        return cls(table, num_classes, "any value (unlisted ids are ignored)", beyond=ignore)

    def __call__(self, raw: np.ndarray | torch.Tensor, path: object) -> torch.Tensor:
        """Map an integer mask (H, W) to class ids, int64 (H, W); ``path`` names the file in errors.

        Done in numpy: one table lookup, and no thread-pool start-up cost per small tensor op.
        """
        raw = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        size = len(self.table)
        if raw.dtype == np.uint8 or raw.size == 0:
            mapped = self.table[raw]
        else:
            inside = (raw >= 0) & (raw < size)
            mapped = np.full(raw.shape, self.beyond, dtype=np.int64)
            mapped[inside] = self.table[raw[inside]]
        bad = mapped < 0
        if bad.any():
            self._raise(raw, raw[bad], path)
        return torch.from_numpy(mapped)

    def _raise(self, raw: np.ndarray, bad: np.ndarray, path: object) -> None:
        bad_values = np.unique(bad).tolist()
        found = format_values(np.unique(raw).tolist())
        hint = ""
        if self.suggest_reduce_zero and max(bad_values) == self.num_classes:
            hint = "; did you mean reduce_zero_label=true (labels 1..K with 0 = ignore)?"
        raise UserError(
            f"{path}: label values {format_values(bad_values)} out of range for {self.num_classes} "
            f"classes (found {found}; expected {self.expected}){hint}"
        )
