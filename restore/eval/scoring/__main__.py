"""Command line: python -m restore.eval.scoring BENCH --answers A.jsonl --data-root D --out-dir O,
or python -m restore.eval.scoring BENCH --data-root D --check-data (are the scorer's data files there and consistent?).

Exit status: 0 scored; 2 data files missing or inconsistent; 3 (--strict only) the answers are not a
clean, complete run; 4 the answers cannot be scored (none matches an item of the benchmark)."""
from __future__ import annotations

import argparse
import sys

from . import DEFAULT_DATA_ROOT, AnswersError, DataError, check_data, score, scorer_names

EXIT_DATA_MISSING = 2
EXIT_INCOMPLETE = 3
EXIT_UNUSABLE_ANSWERS = 4


def format_table(summary: dict) -> str:
    """A small human-readable table of a metrics.json summary."""
    rows = []
    main = summary["main_metric"]
    for name, value in summary["metrics"].items():
        if isinstance(value, float):
            shown = f"{value:.2f}"
        elif value is None:
            shown = "n/a"
        else:
            shown = str(value)
        rows.append((name + ("  <- main" if name == main else ""), shown))
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"== {summary['benchmark']}: {summary['n_answers']} answers, {summary['n_expected']} expected"]
    lines += [f"  {name.ljust(width)}  {shown}" for name, shown in rows]
    if summary["n_missing"]:
        lines.append(f"  WARNING: {summary['n_missing']} expected items have no prediction, "
                     f"e.g. {', '.join(map(str, summary['missing_ids'][:5]))}")
    for note in summary["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def strict_problems(summary: dict) -> list[str]:
    """Why a metrics.json summary is not a clean, complete run (empty when it is)."""
    checks = (
        ("n_missing", "expected items have no answer", "missing_ids"),
        ("n_unexpected", "answers match no item of the benchmark", "unexpected_ids"),
        ("n_duplicates", "items were answered more than once", None),
        ("n_bad_answer_lines", "answer-file lines are not valid JSON objects", "bad_answer_lines"),
    )
    problems = []
    for count_field, what, examples_field in checks:
        count = summary.get(count_field) or 0
        if count:
            examples = (summary.get(examples_field) or []) if examples_field else []
            shown = f", e.g. {', '.join(map(str, examples[:3]))}" if examples else ""
            problems.append(f"{count} {what}{shown}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.eval.scoring", description=__doc__)
    parser.add_argument("bench", choices=scorer_names())
    parser.add_argument("--answers", help="answer file (JSONL) written by the entry point (required unless --check-data)")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder holding gqa/, MME/, pope/, ...")
    parser.add_argument("--out-dir", help="where metrics.json and submission files go (required unless --check-data)")
    parser.add_argument("--check-data", action="store_true",
                        help=f"only check that the data files the scorer reads exist (exit {EXIT_DATA_MISSING} if not)")
    parser.add_argument("--model-id", default=None, help="name used in submission file names (default: the answers' model_id)")
    parser.add_argument("--strict", action="store_true",
                        help=f"exit {EXIT_INCOMPLETE} unless every expected item has exactly one answer and the file "
                             "has no unexpected ids and no invalid lines")
    args = parser.parse_args(argv)
    if args.check_data:
        try:
            check_data(args.bench, args.data_root)
        except DataError as error:
            print(f"error: cannot score {args.bench} later: {error}", file=sys.stderr)
            return EXIT_DATA_MISSING
        return 0
    if not args.answers or not args.out_dir:
        parser.error("--answers and --out-dir are required (unless --check-data)")
    try:
        summary = score(args.bench, args.answers, args.data_root, args.out_dir, args.model_id)
    except DataError as error:
        print(f"error: cannot score {args.bench}: {error}", file=sys.stderr)
        return EXIT_DATA_MISSING
    except AnswersError as error:
        print(f"error: cannot score {args.bench}: {error}", file=sys.stderr)
        return EXIT_UNUSABLE_ANSWERS
    print(format_table(summary))
    print(f"  written: {', '.join(summary['files'])}")
    problems = strict_problems(summary) if args.strict else []
    if problems:
        print(f"error (--strict): {'; '.join(problems)}", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
