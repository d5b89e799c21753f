"""Search η_cap(T) per step budget: ``python tune/eta_cap_search.py [key=value ...]``.

    python tune/eta_cap_search.py                                  # offline embedded default (oracle:hmm)
    python tune/eta_cap_search.py checkpoint=s3://bucket/run/ckpt-100 steps=128,256,512,1024 \
        trials=24 samples=512 storage=postgresql://postgres@db/optuna ray_address=auto
    python tune/eta_cap_search.py --help

Re-running the same command continues the study. The table and the fitted rule land in
``<out_dir>/eta_cap_table.json`` / ``eta_cap_rule.json`` for ``jobs/sample.py eta_cap_table=<file>``.
The last stdout line is a JSON summary.
"""

from __future__ import annotations

import sys

from dsl.config import describe
from dsl.errors import run_cli


def main(argv: list[str]) -> int:
    from dsl.service.search import SearchConfig, load_search_config, run_search

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(describe(SearchConfig))
        return 0
    def body() -> dict:
        summary = run_search(load_search_config(argv))
        return {k: v for k, v in summary.items() if k != "records"}

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
