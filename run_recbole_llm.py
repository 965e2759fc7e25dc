"""Command line, RecBole style: --model (one name or a comma list), --dataset, --config_files, any --key=value; or
--recommend=CHECKPOINT: the top-k items of users (--user_id) or of a history (--history) from a saved model."""

import argparse
import logging
import sys

from recbole_llm.errors import RecBoleLLMError

RECBOLE_DEFAULT_SEED = 2020  # RecBole's overall.yaml


def main():
    if any(argument.startswith("--recommend") for argument in sys.argv[1:]):
        return recommend_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="model name, or a comma list to compare")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="RecBole dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML files")
    # a comparison: every model once per seed, and each row's paired difference to reference models
    parser.add_argument("--seeds", type=str, default=None, help="seeds, comma separated: every model once per seed")
    parser.add_argument("--repeats", type=int, default=None, help="N seeds from RecBole's default seed, 2020 .. 2020+N-1")
    parser.add_argument("--reference", type=str, default=None, help="models to compare every row with (default: the first)")
    # RecBole's multi-process arguments (run_recbole.py): processes on this machine, and the group they join
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine, one per GPU of gpu_id")
    parser.add_argument("--ip", type=str, default="localhost", help="address of the machine running rank 0")
    parser.add_argument("--port", type=str, default="5678", help="free port on that machine")
    parser.add_argument("--world_size", type=int, default=-1, help="processes on all machines (-1: nproc)")
    parser.add_argument("--group_offset", type=int, default=0, help="rank of this machine's first process")
    args, _ = parser.parse_known_args()  # the rest (--key=value) is read by RecBole's Config

    from recbole_llm.quick_start import run

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    models = comma_list(args.model)
    try:
        seeds = run_seeds(args, sys.argv[1:])
        run(models, args.dataset, config_file_list, nproc=args.nproc, world_size=args.world_size, ip=args.ip,
            port=args.port, group_offset=args.group_offset, seeds=seeds,
            references=comma_list(args.reference) if args.reference else None)
    except RecBoleLLMError as error:
        print(f"recbole_llm: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the log's last line says how to resume
        sys.exit(130)


def comma_list(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def run_seeds(args, argv):
    """The seeds of --seeds or --repeats (None: the config's seed, one run per model)."""
    if args.seeds is not None and args.repeats is not None:
        raise RecBoleLLMError("--seeds and --repeats both say how many runs: give one of them")
    if (args.seeds is not None or args.repeats is not None) and any(a.startswith("--seed=") for a in argv):
        # RecBole's --seed=N on the command line would win over every run's own seed
        raise RecBoleLLMError("--seed with --seeds or --repeats: list every seed in --seeds=2020,2021,... instead")
    if args.repeats is not None:
        if args.repeats < 1:
            raise RecBoleLLMError(f"--repeats={args.repeats}: give a number of runs of at least 1, e.g. --repeats=3")
        return [RECBOLE_DEFAULT_SEED + repeat for repeat in range(args.repeats)]
    if args.seeds is None:
        return None
    try:
        return [int(seed) for seed in comma_list(args.seeds)]
    except ValueError:
        raise RecBoleLLMError(f"--seeds={args.seeds}: give whole numbers separated by commas, e.g. "
                              f"--seeds=2020,2021,2022") from None


def recommend_main(argv):
    parser = argparse.ArgumentParser(prog="run_recbole_llm.py --recommend=CHECKPOINT",
                                     description="top-k items for people, from a model a run saved")
    parser.add_argument("--recommend", required=True, help="a checkpoint of a run: saved/<Model>-<time>.pth")
    parser.add_argument("--user_id", type=str, default=None, help="user ids of the dataset, comma separated")
    parser.add_argument("--history", type=str, default=None, help="item ids or titles, oldest first, ';' between")
    parser.add_argument("--topk", type=int, default=10, help="items per user")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--trust_checkpoint", type=lambda text: text.lower() == "true", default=False,
                        help="read a checkpoint that is not plain data (see the README's Bad input)")
    args = parser.parse_args(argv)

    from recbole_llm.recommend import formatted, parse_history, recommend

    logging.disable(logging.INFO)  # the dataset's and the model's log lines would bury the table
    try:
        user_ids = [user.strip() for user in args.user_id.split(",") if user.strip()] if args.user_id else None
        history = parse_history(args.history) if args.history is not None else None
        rows = recommend(args.recommend, user_ids, history, args.topk, args.trust_checkpoint)
    except RecBoleLLMError as error:
        print(f"recbole_llm: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        logging.disable(logging.NOTSET)
    print(formatted(rows, args.format))


if __name__ == "__main__":
    main()
