"""Sites: a component (resid, attn, mlp) at a group of token positions."""

from dataclasses import dataclass

COMPONENTS = ("resid", "attn", "mlp")
POSITION_GROUPS = ("subject", "subject_last", "last", "relation", "all")


@dataclass(frozen=True)
class Site:
    name: str  # path-safe key from the config
    label: str  # row label in figures
    component: str
    positions: str

    @classmethod
    def from_config(cls, name, spec):
        return cls(name, spec.get("label", name), spec["component"], spec["positions"])


def positions(group, length, subject_start, subject_end):
    """Token indices of a position group in a prompt of `length` tokens with subject [start, end)."""
    if group == "subject":
        return list(range(subject_start, subject_end))
    if group == "subject_last":
        return [subject_end - 1]
    if group == "last":
        return [length - 1]
    if group == "relation":
        return list(range(subject_end, length - 1))
    if group == "all":
        return list(range(length))
    raise ValueError(f"unknown position group '{group}'; known: {', '.join(POSITION_GROUPS)}")
