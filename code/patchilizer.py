"""Text <-> patch ids, exactly as the official CLaMP 3 ``M3Patchilizer`` (reference section 3).

A patch is one line of ABC header, one bar (plus its barline) of an ABC body, or a run of
consecutive same-type MTF messages, encoded as ``[BOS] + chars + [EOS]`` cut/padded to 64 ids.
"""

from __future__ import annotations

import random
import re

from unidecode import unidecode

PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3

# Alternation order matters: "|:" must win over "|".
BAR_DELIMITERS = ("|:", "::", ":|", "[|", "||", "|]", "|")
_BAR_SPLIT = re.compile("(" + "|".join(re.escape(d) for d in BAR_DELIMITERS) + ")")
_LINES = re.compile(r".*?\n|.*$")


class M3Patchilizer:
    """Official-compatible patchilizer. ``patch_size`` and ``patch_length`` default to config."""

    def __init__(self, patch_size: int = 64, patch_length: int = 512):
        self.patch_size = patch_size
        self.patch_length = patch_length
        self.delimiters = BAR_DELIMITERS

    # ------------------------------------------------------------------ text -> patch strings
    def split_bars(self, body: str) -> list[str]:
        """Bars of one ABC body line, each ending with its barline. Text after the last barline
        (newline, volta number, comment) is dropped, as in the official code."""
        parts = [p for p in _BAR_SPLIT.split(body) if p]
        if parts and parts[0] in self.delimiters and len(parts) > 1:
            parts = [parts[0] + parts[1]] + parts[2:]
        return [parts[2 * i] + parts[2 * i + 1] for i in range(len(parts) // 2)]

    def patch_strings(self, item: str, add_special_patches: bool = False) -> list[str]:
        """The patch strings of ``item`` before truncation and id conversion."""
        item = unidecode(item.replace("L:1/8\n", ""))
        lines = [line for line in _LINES.findall(item) if line]
        patches: list[str] = []
        if lines and lines[0].split(" ")[0] == "ticks_per_beat":
            patches = self._mtf_patches(lines)
        else:
            for line in lines:
                if len(line) > 1 and ((line[0].isalpha() and line[1] == ":") or line.startswith("%%")):
                    patches.append(line)
                    continue
                bars = self.split_bars(line)
                if bars:
                    bars[-1] += "\n"
                    patches.extend(bars)
        if add_special_patches:
            patches = [chr(BOS_ID) * self.patch_size] + patches + [chr(EOS_ID) * self.patch_size]
        return patches

    def _mtf_patches(self, lines: list[str]) -> list[str]:
        # Consecutive messages whose type word prefixes the running patch are packed with a TAB,
        # without the type word, while the patch stays within patch_size - 2 characters.
        patches: list[str] = []
        patch = ""
        limit = self.patch_size - 2
        for line in lines:
            fields = line.split(" ")
            head, rest = fields[0], " ".join(fields[1:])
            if patch.startswith(head) and len(patch) + len(rest) <= limit:
                patch = patch[:-1] + "\t" + rest
            else:
                if patch:
                    patches.append(patch)
                patch = line
        if patch:
            patches.append(patch)
        return patches

    # ------------------------------------------------------------------ patch strings <-> ids
    def bar2patch(self, text: str) -> list[int]:
        ids = [BOS_ID] + [ord(c) for c in text] + [EOS_ID]
        ids = ids[: self.patch_size]
        return ids + [PAD_ID] * (self.patch_size - len(ids))

    def patch2bar(self, patch: list[int]) -> str:
        return "".join(chr(i) for i in patch if i > MASK_ID)

    def encode(
        self,
        item: str,
        patch_size: int | None = None,
        add_special_patches: bool = False,
        truncate: bool = False,
        random_truncate: bool = False,
        rng: random.Random | None = None,
    ) -> list[list[int]]:
        """Official ``encode``: a list of ``patch_size``-long id lists.

        With ``truncate`` and more than ``patch_length`` patches, ``choice`` is always called on
        ``rng`` (the ``random`` module's global state by default, as officially, so the stream
        matches) and picks head/tail/middle only when ``random_truncate`` is set; otherwise the
        head is kept. A trainer passes its own ``random.Random`` so examples do not depend on
        global state.
        """
        if patch_size is not None and patch_size != self.patch_size:
            return M3Patchilizer(patch_size, self.patch_length).encode(
                item, add_special_patches=add_special_patches, truncate=truncate,
                random_truncate=random_truncate, rng=rng)
        source = random if rng is None else rng
        patches = self.patch_strings(item, add_special_patches=add_special_patches)
        if truncate and len(patches) > self.patch_length:
            choice = source.choice(["head", "tail", "middle"])
            if choice == "head" or not random_truncate:
                patches = patches[: self.patch_length]
            elif choice == "tail":
                patches = patches[-self.patch_length :]
            else:
                start = source.randint(1, len(patches) - self.patch_length)
                patches = patches[start : start + self.patch_length]
        return [self.bar2patch(p) for p in patches]

    def decode(self, patches: list[list[int]]) -> str:
        return "".join(self.patch2bar(p) for p in patches)


def remove_instrument_info(item: str) -> str:
    """Training augmentation of the official code: drop instrument names (ABC ``V:`` ``nm=``/``snm=``)
    or set every MTF ``program_change`` program to 0."""
    out = []
    for line in item.split("\n"):
        if line.startswith("V:"):
            cut = line.find(" nm=")
            if cut == -1:
                cut = line.find(" snm=")
            if cut != -1:
                line = line[:cut]
        elif line.startswith("program_change"):
            line = " ".join(line.split(" ")[:-1] + ["0"])
        out.append(line)
    return "\n".join(out)
