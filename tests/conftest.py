import pytest
import torch
from transformers import LlamaForCausalLM

from patchmap import models, synthetic
from patchmap.builtin import llama_config, word_tokenizer
from patchmap.pairs import make_pairs
from patch_runs import run_intervention


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP's waiting makes them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world():
    return synthetic.make_world(seed=0, name_pool=8, subject_sets=6, orders=2)


@pytest.fixture(scope="session")
def pairs_for(world):
    """pairs_for(model, tokenizer, examples, seed, intervention="swap", facts=None, known_only=False, **settings):
    the pairs of the world's facts (or `facts`) that the Python API would make, for the intervention as a
    run with `settings` makes it."""
    def make(model, tokenizer, examples=6, seed=0, intervention="swap", facts=None, known_only=False, **settings):
        return make_pairs(model, tokenizer, synthetic.facts(world) if facts is None else facts, examples, seed,
                          known_only=known_only, intervention=run_intervention(intervention, **settings))
    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, world):
    """A random-weight Llama with a word-level tokenizer, saved and loaded like any checkpoint."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    model = LlamaForCausalLM(llama_config(tokenizer, layers=3, hidden=32, heads=4, mlp=64))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return models.load(str(tiny_model_dir))


# The files whose workflow runs take longest, longest first. `make test` runs files in two pytest-xdist
# processes in collection order (--no-loadscope-reorder): these start first and the short files fill in
# beside them, so that neither process is left running a long file alone at the end.
LONGEST_FIRST = ["test_known_facts.py", "test_slurm.py", "test_faults.py", "test_jobs.py", "test_user_errors.py",
                 "test_workflow.py", "test_explorer.py", "test_fast_engine.py", "test_reporting.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order is kept


def pytest_sessionfinish(session):
    """A pytest-xdist worker (`make test` runs two) hands its largest differences to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from tolerances import largest
        workeroutput["largest"] = {metric: list(seen) for metric, seen in largest.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller merges each worker's largest differences (pytest-xdist only)."""
    from tolerances import merge_largest
    merge_largest(getattr(node, "workeroutput", {}).get("largest", {}))


def pytest_terminal_summary(terminalreporter):
    """The largest difference per metric between two computations that should agree (tests/tolerances.py)."""
    from tolerances import TOLERANCES, largest
    if largest:
        terminalreporter.section("largest differences between engines, per metric")
        for metric, (difference, share) in sorted(largest.items()):
            atol, rtol = TOLERANCES[metric]
            terminalreporter.line(f"{metric:18s} {difference:.3g}  ({share:.0%} of its tolerance: "
                                  f"{atol:g} absolute + {rtol:g} relative)")
