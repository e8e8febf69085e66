"""A stand-in for an entry-point process in the launcher's tests: plans like the real one (same flags, the
same answers and settings files) but answers "yes" to everything without a model.

    python tests/launch_fake_shard.py ENTRY [entry-point flags]

FAKE_FAIL_CHUNK=K: chunk K prints an error and exits 3. FAKE_STALL=1: every chunk writes one answer and
then waits (for the interrupt tests).
"""
import os
import sys
import time

from restore.eval.answer_files import dumps_line, read_answer_lines, read_meta, write_meta
from restore.eval.arguments import build_parser
from restore.eval.entry_point import entry_by_name
from restore.eval.plan import plan_runs


def main(argv):
    entry = entry_by_name(argv[0])
    args = build_parser(entry).parse_args(argv[1:])
    if str(args.chunk_idx) == os.environ.get("FAKE_FAIL_CHUNK"):
        print("error: this chunk was told to fail", flush=True)
        return 3
    for plan in plan_runs(entry, args):
        meta = {"entry": entry.name, "settings": plan.settings, "num_chunks": plan.num_chunks,
                "chunk_idx": plan.chunk_idx, "n_items": len(plan.items), "complete": False}
        previous = read_meta(plan.answers_file)
        if previous and previous.get("complete") and len(read_answer_lines(plan.answers_file)[0]) == len(plan.items):
            continue  # as a real rerun: a finished chunk file stays as it is
        write_meta(plan.answers_file, meta)
        with open(plan.answers_file, "w", encoding="utf-8") as f:
            for n, item in enumerate(plan.items):
                f.write(dumps_line(entry, entry.answer_line(item, "yes", "fake")))
                f.flush()
                if os.environ.get("FAKE_STALL"):
                    time.sleep(600)
        write_meta(plan.answers_file, {**meta, "complete": True})
        plan.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
