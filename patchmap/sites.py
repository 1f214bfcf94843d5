"""Sites: a component (resid, attn, mlp, head) at a group of token positions.

A head site (component `head`) stands for every attention head of the layer: its activation is the input
of the attention's output projection, [..., heads x head dim], each head's output side by side before
they are mixed. The patch job runs it as one site per head (`one_per_head`: `head` set), each of which
writes only its head's slice; a head site without `head` writes every head at once.

The groups: the subject (all of it, or ROME's token roles: its first, middle and last token), the
tokens after it (`relation` = all of them up to the last; ROME's first subsequent token and further
tokens), the last token, and every token. A group may be empty for a prompt (no middle in a 2-token
subject); patching an empty group changes nothing."""

from dataclasses import dataclass, replace

from .schema import allowed

COMPONENTS = allowed("sites", "component")
POSITION_GROUPS = allowed("sites", "positions")
TRACED = "traced"  # a trace's group (not a config's): each example's own token, the pairs' `traced_position`


@dataclass(frozen=True)
class Site:
    name: str  # path-safe key from the config
    label: str  # row label in figures
    component: str
    positions: str
    head: int = None  # a head site's one head that is patched (None: every head together)

    @classmethod
    def from_config(cls, name, spec):
        return cls(name, spec.get("label", name), spec["component"], spec["positions"])

    @property
    def has_heads(self) -> bool:
        return self.component == "head"

    @property
    def key(self) -> str:
        """The site's key in an engine's results: its name, with its head for one head of a head site."""
        return self.name if self.head is None else f"{self.name}/{self.head}"


def one_per_head(site: Site, heads: int) -> list:
    """A head site as one site per head (the sites the engines patch), in head order."""
    return [replace(site, head=h) for h in range(heads)]


def positions(group: str, length: int, subject_start: int, subject_end: int) -> list:
    """Token indices of a position group in a prompt of `length` tokens with subject [start, end)."""
    if group == "subject":
        return list(range(subject_start, subject_end))
    if group == "subject_first":
        return [subject_start]
    if group == "subject_middle":
        return list(range(subject_start + 1, subject_end - 1))
    if group == "subject_last":
        return [subject_end - 1]
    if group == "after_subject_first":  # ROME's "first subsequent token"
        return [subject_end] if subject_end < length - 1 else []
    if group == "after_subject_further":  # ROME's "further tokens", before the last
        return list(range(subject_end + 1, length - 1))
    if group == "last":
        return [length - 1]
    if group == "relation":
        return list(range(subject_end, length - 1))
    if group == "non_subject":  # every token before the last that is not a subject token
        return [p for p in range(length - 1) if not subject_start <= p < subject_end]
    if group == "all":
        return list(range(length))
    raise ValueError(f"unknown position group '{group}'; known: {', '.join(POSITION_GROUPS)}")


def site_positions(pairs, site: Site) -> list:
    """Token positions of `site` in each example of a pairs dataset (identical in target and source)."""
    if site.positions == TRACED:
        return [[int(p)] for p in pairs["traced_position"].values]
    return [positions(site.positions, int(n), int(a), int(b))
            for n, a, b in zip(pairs["length"].values, pairs["subject_start"].values, pairs["subject_end"].values)]
