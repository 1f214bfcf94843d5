"""The facts a trace names (the config's `traces`): each a fact id in the trace's dataset or inline (subject,
prompt, attribute), with the name its files take (results/traces/{trace}/{name}.nc) and, for swap, its
source; and what the schema cannot check of them. Plain Python: the workflow's config checks and rules use
it, before any job runs."""

import re

from .errors import UserError
from .schema import name_pattern


def is_inline(item) -> bool:
    """Whether a trace's fact (or source) is given inline (subject, prompt, attribute) rather than by id."""
    return isinstance(item, dict) and "prompt" in item


def fact_name(item, index: int) -> str:
    """The name of a trace's fact number `index`: its id, else fact<index>."""
    if isinstance(item, dict):
        return str(item["id"]) if "id" in item else f"fact{index}"
    return str(item)


def names(spec: dict) -> list:
    """The names of a trace's facts, in order."""
    return [fact_name(item, i) for i, item in enumerate(spec["facts"])]


def source_of(item):
    """A trace fact's source (an id or an inline fact), or None."""
    return item.get("source") if isinstance(item, dict) else None


def problems(spec: dict) -> list:
    """(index or None, message) for each mistake in a trace's facts that the schema cannot see: a name used
    twice or not fit for a file name, an inline subject missing from its prompt, a swap fact without a
    source or a noise fact with one, a fact by id without a dataset."""
    found, seen = [], {}
    for i, item in enumerate(spec["facts"]):
        name = fact_name(item, i)
        if not re.fullmatch(name_pattern(), name):
            found.append((i, f"fact id '{name}' cannot name its result file (letters, digits, '_', '.' and '-'); "
                             "give the fact inline with another `id`"))
        elif name in seen:
            found.append((i, f"fact '{name}' is traced twice (facts {seen[name]} and {i}); give one another `id`"))
        seen.setdefault(name, i)
        for role, fact in (("", item), ("source: ", source_of(item))):
            if is_inline(fact) and fact["subject"] not in fact["prompt"]:
                found.append((i, f"{role}subject '{fact['subject']}' does not occur in the prompt '{fact['prompt']}'"))
            elif fact is not None and not is_inline(fact) and not spec.get("dataset"):
                found.append((i, f"{role}fact id '{fact_name(fact, i) if role else name}' needs the trace's "
                                 "`dataset`, or give the fact inline (subject, prompt, attribute)"))
        if spec["intervention"] == "swap" and source_of(item) is None:
            found.append((i, "a swap trace patches each fact with its `source`: give it (a fact id or inline)"))
        if spec["intervention"] != "swap" and source_of(item) is not None:
            found.append((i, f"`source` is for swap traces; this trace's intervention is {spec['intervention']}"))
    return found


def facts_by_id(dataset_facts: list) -> dict:
    return {str(f["id"]): f for f in dataset_facts}


def resolved(item, index: int, by_id: dict, where: str) -> dict:
    """A trace's fact (or source) as a fact dict (id, subject, relation, prompt, attribute): inline, or looked
    up by id in the dataset's facts `by_id`; a patchmap error naming `where` for an id not there."""
    if is_inline(item):
        return {"id": fact_name(item, index), "relation": "", **{k: item[k] for k in ("subject", "prompt")},
                "attribute": item["attribute"].strip()}
    key = str(item["id"] if isinstance(item, dict) else item)
    if key not in by_id:
        some = ", ".join(list(by_id)[:3])
        raise UserError(f"{where}: fact id '{key}' is not in the dataset ({len(by_id)} facts; ids like {some})")
    return by_id[key]


def fact_and_source(spec: dict, name: str, dataset_facts: list, where: str) -> tuple:
    """(index, fact, source or None) of the trace's fact `name`, resolved against the dataset's facts."""
    index = names(spec).index(name)
    item, by_id = spec["facts"][index], facts_by_id(dataset_facts)
    source = source_of(item)
    return (index, resolved(item, index, by_id, where),
            None if source is None else resolved(source, index, by_id, f"{where}, source"))


def inline_facts(spec: dict) -> list:
    """The trace's inline facts (and sources), as fact dicts: the facts whose subjects scale the noise of a
    trace without a dataset."""
    out = []
    for i, item in enumerate(spec["facts"]):
        for fact in (item, source_of(item)):
            if is_inline(fact):
                out.append(resolved(fact, i, {}, ""))
    return out
