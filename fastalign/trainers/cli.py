"""``fastalign train {sft,rm,dpo,simpo,cpo,orpo,kto,ppo,grpo,online-dpo}``: the trainers' command
line.

Each trainer's options are the fields of its config dataclass; the parser is built from them (the
field's ``help`` metadata, its type and default), so the CLI, the Python API and ``--help`` never
drift apart. ``--model``, ``--data`` and ``--eval-data`` default to the tiny Llama and datasets
shipped in ``fastalign.assets`` (no download).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fastalign.ops._checks import first_line

_TRAIN_DESCRIPTION = """\
Train a Hugging Face causal LM with a fused alignment loss (the LM head never materialises the
[tokens x vocab] logits). Without --model and --data it trains the tiny Llama-architecture model
and the small dataset shipped with fastalign: no download needed.

Data (TRL's formats, plain strings or chat messages; JSONL, or with the datasets package
Parquet, Arrow, CSV, JSON, a save_to_disk folder or a hub id; --data-columns renames columns):
  sft         {"prompt", "completion"}, {"text"} or {"messages": [...]}
  rm, dpo, simpo, cpo, orpo
              {"prompt", "chosen", "rejected"}
  kto         {"prompt", "completion", "label": true|false}
  ppo, grpo, online-dpo
              {"prompt"}; other keys (an "answer", say) reach the --reward-fn functions

The output directory receives the model (save_pretrained: load it back with
transformers.AutoModelForCausalLM.from_pretrained(OUTPUT)), metrics.jsonl and metrics.csv (one
row per step), plots/*.png and, with --save-steps, checkpoints/ (resume with --resume).
"""

_EXAMPLES = """\
Examples:
  fastalign train dpo --output runs/dpo --max-steps 60
  fastalign train sft --model ./my-model --data sft.jsonl --output runs/sft --bf16
  fastalign train dpo --loss-type sigmoid,sft --loss-weights 1,0.2 --output runs/rpo
  fastalign train grpo --output runs/grpo --num-generations 4
  fastalign train dpo --output runs/dpo --save-steps 10 --resume
  fastalign train sft --data org/dataset --data-columns prompt=question,completion=answer
  fastalign train dpo --config run.yaml --num-epochs 2
"""


def _option_type(annotation: str):
    """How to parse a config field's value from its (string) type annotation."""
    optional = "None" in annotation
    base = annotation.replace("| None", "").replace("None |", "").strip()
    if base.startswith("tuple"):
        item = float if "float" in base else str
        # "sigmoid, sft" as well as "sigmoid,sft": spaces around the commas are not part of a value
        parse = lambda text: tuple(item(part.strip()) for part in text.split(",")  # noqa: E731
                                   if part.strip())
    else:
        parse = {"int": int, "float": float, "str": str}.get(base.split("|")[0].strip(), str)

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base}, got {text!r}") from None

    convert.__name__ = base  # argparse names the type in its error messages
    return convert


def add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One ``--field-name`` option per field of ``config_class`` (booleans get ``--no-...``).

    Field types are read from their annotations, which are strings (``from __future__ import
    annotations``): "int", "float | None", "tuple[float, ...]", "bool", "str".
    """
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if field.name in ("output_dir",):
            continue  # --output, a required argument of its own
        default = field.default
        if field.type == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{help_text} (default: "
                                f"{'on' if default else 'off'})")
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(flag, dest=field.name, type=_option_type(field.type),
                            default=default, metavar=field.name.upper(),
                            help=f"{help_text} (default: {shown})")


def config_from_args(config_class: type, args: argparse.Namespace, output_dir: str):
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(config_class)
              if field.name != "output_dir"}
    return config_class(output_dir=output_dir, **values)


class _KindParser(argparse.ArgumentParser):
    """The parser of one kind: values from ``--config FILE`` become the defaults of a second
    parse, so that every flag given on the command line overrides the file."""

    def parse_known_args(self, args=None, namespace=None):
        first, _ = super().parse_known_args(args, argparse.Namespace())
        if getattr(first, "config", None) is None:
            return super().parse_known_args(args, namespace)
        namespace = namespace if namespace is not None else argparse.Namespace()
        for name, value in self._config_file_values(first.config).items():
            setattr(namespace, name, value)  # argparse keeps a namespace's values as defaults
        return super().parse_known_args(args, namespace)

    def _fail(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def _config_file_values(self, file: str) -> dict:
        """The file's values, by option ``dest``, each parsed as its flag would parse it."""
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if path.suffix.lower() == ".json" else _yaml_load(text)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            self._fail(f"--config {file}: cannot be read ({first_line(error)})")
        if values is None:
            return {}
        if not isinstance(values, dict):
            self._fail(f"--config {file}: expected a mapping of option names to values, got "
                       f"{type(values).__name__}")
        actions = {action.dest: action for action in self._actions
                   if action.dest not in ("help", "config") and action.option_strings}
        out = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            action = actions.get(name)
            if action is None:
                close = difflib.get_close_matches(name, actions, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self._fail(f"--config {file}: unknown key {key!r}{hint}; the keys are the option "
                           f"names of `{self.prog} --help`")
            out[name] = self._parsed(action, value, f"--config {file}: {key}")
        return out

    def _parsed(self, action: argparse.Action, value, where: str):
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                self._fail(f"{where}: expected true or false, got {value!r}")
            return value
        if isinstance(value, dict) and action.dest == "data_columns":
            value = [f"{key}={column}" for key, column in value.items()]  # {prompt: question}
        if isinstance(value, (dict, bool)):
            self._fail(f"{where}: expected {getattr(action.type, '__name__', 'str')}, got "
                       f"{value!r}")
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        if action.type is None:
            return text
        try:
            return action.type(text)
        except (argparse.ArgumentTypeError, ValueError) as error:
            self._fail(f"{where}: {error}")


def _yaml_load(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:  # one line: the problem and where, without the excerpt
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"invalid YAML: {getattr(error, 'problem', None) or error}{where}") \
            from None


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    from fastalign.trainers.run import JOBS

    train = subparsers.add_parser(
        "train", help="train a model with a fused alignment loss (sft, rm, dpo, simpo, cpo, "
                      "orpo, kto, ppo, grpo, online-dpo)",
        description=_TRAIN_DESCRIPTION, epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = train.add_subparsers(dest="kind", metavar="KIND", required=True,
                                 parser_class=_KindParser)
    for kind, job in JOBS.items():
        parser = kinds.add_parser(kind, help=job.help, description=job.description)
        parser.add_argument("--model", default=None,
                            help="a Hugging Face model directory or hub id (default: the tiny "
                                 "Llama shipped with fastalign, randomly initialised from --seed)")
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="a YAML or JSON file of option values by their names (max_steps: "
                                 "20, loss_type: [sigmoid, sft], data: ...); flags given on the "
                                 "command line override it")
        parser.add_argument("--data", default=None,
                            help=f"training data: a JSONL, Parquet, Arrow, CSV or JSON file, a "
                                 f"save_to_disk folder or a hub dataset id (all but JSONL need "
                                 f"the datasets package) (default: the shipped {job.data_kind} "
                                 f"data)")
        parser.add_argument("--eval-data", default=None,
                            help="held-out data of the same format, evaluated at the end and "
                                 "every --eval-steps (default: the shipped eval set for dpo and "
                                 "rm with the default data, else none)")
        parser.add_argument("--data-split", default="train", metavar="SPLIT",
                            help="the split of a --data folder or hub id (default: train)")
        parser.add_argument("--eval-split", default="test", metavar="SPLIT",
                            help="the split of an --eval-data folder or hub id (default: test)")
        parser.add_argument("--data-columns", default=None, metavar="KEY=COLUMN,...",
                            help="rename the columns of --data and --eval-data to the format's "
                                 "keys, e.g. prompt=question,completion=answer (default: none)")
        parser.add_argument("--output", "-o", default=f"fastalign-runs/{kind}",
                            help="output directory (model, metrics, plots, checkpoints; "
                                 f"default: fastalign-runs/{kind})")
        if not job.sequence_classifier:
            parser.add_argument("--lora-r", type=int, default=None, metavar="R",
                                help="train LoRA adapters of rank R instead of the full model "
                                     "(needs peft); the reference is then the model with its "
                                     "adapters disabled")
            parser.add_argument("--lora-targets", default="auto",
                                help="comma-separated module names that get LoRA adapters, or "
                                     "auto: PEFT's default for the architecture (q_proj,v_proj "
                                     "for Llama, c_attn for GPT-2) (default: auto)")
        for name, help_text in job.extra_arguments.items():
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                                help=help_text)
        add_config_options(parser, job.config_class)
        parser.set_defaults(handler=_run_train, job=job)


def _run_train(args: argparse.Namespace) -> int:
    from fastalign.data import DataError
    from fastalign.ops._backends import check_environment
    from fastalign.trainers.checkpoint import CheckpointError
    from fastalign.trainers.run import run_job

    try:
        check_environment()
        config = config_from_args(args.job.config_class, args, args.output)
    except (ValueError, TypeError) as error:
        print(f"fastalign train {args.kind}: error: {error}", file=sys.stderr)
        return 2
    extra = {name: getattr(args, name) for name in args.job.extra_arguments}
    if not args.job.sequence_classifier:
        extra.update(lora_r=args.lora_r, lora_targets=args.lora_targets)
    try:
        run_job(args.job, config, model=args.model, data=args.data, eval_data=args.eval_data,
                data_split=args.data_split, eval_split=args.eval_split,
                data_columns=args.data_columns, **extra)
    except (DataError, CheckpointError, ValueError, FileNotFoundError, OSError) as error:
        print(f"fastalign train {args.kind}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = (f"the checkpoints written every --save-steps {args.save_steps}" if
                 args.save_steps else "nothing: this run wrote no checkpoints (--save-steps 0)")
        print(f"fastalign train {args.kind}: interrupted; {args.output} keeps {saved}; run the "
              f"same command with --resume to continue from the newest one", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``fastalign train ARGV...``. ``fastalign.cli`` adds this command to the full ``fastalign``
    parser; this parser holds it alone, so that nothing here imports the module above."""
    parser = argparse.ArgumentParser(prog="fastalign")
    add_train_command(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(["train", *(argv or [])])
    return args.handler(args)
