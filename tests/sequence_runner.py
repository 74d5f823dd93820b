"""``main_pretrain.py`` once per group of flags, one group after the other in the same process(es):

    python -m torch.distributed.run --nproc_per_node=2 tests/sequence_runner.py FLAGS [--then FLAGS ...]

so that one torchrun launch (whose start, with torch and timm imports in 3 processes, costs more than
a tiny run) trains every method in turn (tests/test_vit_cli.py). Each run initialises and ends the
process group as a user's run does."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import main_pretrain  # noqa: E402


def joined(flag_groups):
    """The command line of :func:`groups`: the groups separated by ``--then``."""
    out = []
    for flags in flag_groups:
        out += [*(["--then"] if out else []), *flags]
    return out


def groups(argv):
    group = []
    for arg in argv:
        if arg == "--then":
            yield group
            group = []
        else:
            group.append(arg)
    yield group


if __name__ == "__main__":
    for flags in groups(sys.argv[1:]):
        main_pretrain.main(flags)
