"""Command line, RecBole style: --model (one name or a comma list), --dataset, --config_files, any --key=value."""

import argparse
import sys

from recbole_llm.errors import RecBoleLLMError


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="model name, or a comma list to compare")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="RecBole dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML files")
    # RecBole's multi-process arguments (run_recbole.py): processes on this machine, and the group they join
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine, one per GPU of gpu_id")
    parser.add_argument("--ip", type=str, default="localhost", help="address of the machine running rank 0")
    parser.add_argument("--port", type=str, default="5678", help="free port on that machine")
    parser.add_argument("--world_size", type=int, default=-1, help="processes on all machines (-1: nproc)")
    parser.add_argument("--group_offset", type=int, default=0, help="rank of this machine's first process")
    args, _ = parser.parse_known_args()  # the rest (--key=value) is read by RecBole's Config

    from recbole_llm.quick_start import run

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    models = [name.strip() for name in args.model.split(",") if name.strip()]
    try:
        run(models, args.dataset, config_file_list, nproc=args.nproc, world_size=args.world_size, ip=args.ip,
            port=args.port, group_offset=args.group_offset)
    except RecBoleLLMError as error:
        print(f"recbole_llm: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the log's last line says how to resume
        sys.exit(130)


if __name__ == "__main__":
    main()
