"""Command line, RecBole style: --model (one name or a comma list), --dataset, --config_files, any --key=value."""

import argparse
import sys

from recbole_llm.errors import RecBoleLLMError


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="model name, or a comma list to compare")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="RecBole dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML files")
    args, _ = parser.parse_known_args()  # the rest (--key=value) is read by RecBole's Config

    from recbole_llm.quick_start import run_recbole_llms

    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    models = [name.strip() for name in args.model.split(",") if name.strip()]
    try:
        run_recbole_llms(models, args.dataset, config_file_list)
    except RecBoleLLMError as error:
        print(f"recbole_llm: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # the log's last line says how to resume
        sys.exit(130)


if __name__ == "__main__":
    main()
