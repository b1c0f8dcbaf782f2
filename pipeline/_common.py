"""Options and error handling shared by the command-line jobs of ``pipeline/``.

Every CLI's ``main(argv)`` is :func:`run`: parse, set up logging, call the job, and turn a
user error (bad input, missing file, refused output) into one line ``PROG: error: ...`` on
stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable

# XGBoost's OpenMP threads busy-wait by default; on a machine whose cores are shared with
# other jobs a 2-thread fit then runs ~100x slower (measured: 0.15 s -> 8-19 s for a small
# fit).  Passive waiting must be set before the OpenMP runtime loads, i.e. before
# scikit-learn / XGBoost are imported (every CLI imports this module first); an explicit user
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: Errors that mean "bad input": every error class of the library derives from one of these.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once: not when the help already states its default, nor for
    options without a default value (``None``, flags)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text or action.default == []:
            return text
        return super()._get_help_string(action)


def weights_pair(text: str) -> tuple[str, str]:
    """argparse type of ``--weights BACKBONE=FILE``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected BACKBONE=FILE, got {text!r}")
    return name, path


def add_weights_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--weights BACKBONE=FILE`` (repeatable) into ``args.weights``, a list of pairs."""
    parser.add_argument("--weights", action="append", type=weights_pair, default=[], metavar="BACKBONE=FILE",
                        help=help)


def add_training_options(parser: argparse.ArgumentParser, defaults, *, epochs_help: str | None = None,
                         batch_help: str | None = None, val_help: str = "share of images for validation",
                         seed_help: str | None = None, quiet_help: str = "no progress output") -> None:
    """The options every trained network takes, with ``defaults`` from its config class
    (``epochs``, ``batch_size``, ``learning_rate``, ``val_fraction``, ``scale``, ``seed``);
    :func:`training_config` turns them back into those fields."""
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=epochs_help)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=batch_help)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="Adam learning rate")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help=val_help)
    parser.add_argument("--scale", type=float, default=defaults.scale, help="resize factor applied to images first")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=seed_help)
    parser.add_argument("--quiet", action="store_true", help=quiet_help)


def training_config(args: argparse.Namespace) -> dict:
    """The config fields of :func:`add_training_options`' options."""
    return dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                val_fraction=args.val_fraction, scale=args.scale, seed=args.seed)


def setup_logging(timestamps: bool = False, verbose: bool = False) -> None:
    """INFO logs to stderr (DEBUG with ``verbose``), unless the caller (a notebook, a test)
    configured logging already."""
    if not logging.getLogger().handlers:
        fmt = "%(levelname)s %(name)s: %(message)s"
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s " + fmt if timestamps else fmt)
        for noisy in ("matplotlib", "PIL", "h5py", "absl", "tensorflow", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: the libraries' start-up messages and debug logs (off by default)."""
    if not any("--verbose" in action.option_strings for action in parser._actions):
        parser.add_argument("--verbose", action="store_true",
                            help="also show the libraries' start-up messages (TensorFlow, absl, CUDA, "
                            "XGBoost's device probe) and debug logs; by default one plain line says "
                            "which device runs and why")


#: Library parameters whose option has another name in every CLI.
PARAMETER_FLAGS = {"n_folds": "--folds", "scheme": "--labels", "stores": "--features"}


def _option_strings(parser: argparse.ArgumentParser) -> set:
    found = set()
    for action in parser._actions:  # argparse has no public listing of a parser's options
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def cli_message(parser: argparse.ArgumentParser, message: str, flags: dict | None = None) -> str:
    """A library message in the CLI's words: a parameter the library names in backquotes
    (```window```, ```n_folds=3```) becomes this CLI's option (``--window``, ``--folds 3``).

    ``flags`` maps a parameter, or a whole ```name=value```, to the option of this CLI when its
    name is not the parameter's (:data:`PARAMETER_FLAGS` hold those common to every CLI).
    """
    flags = {**PARAMETER_FLAGS, **(flags or {})}
    options = _option_strings(parser)

    def option(match):
        text = match.group(1)
        if text in flags:
            return flags[text]
        name, eq, value = text.partition("=")
        flag = flags.get(name, "--" + name.replace("_", "-"))
        if flag not in options:
            return match.group(0)
        return f"{flag} {value.strip(chr(39))}" if eq else flag

    return re.sub(r"`([a-z][a-z0-9_]*(?:=[^`]*)?)`", option, message)


def run(parser: argparse.ArgumentParser, job: Callable, argv=None, *, errors: tuple = (),
        interrupted: Callable | None = None, exit_on_error: bool = False, timestamps: bool = False,
        flags: dict | None = None):
    """Parse ``argv``, run ``job(args)`` and return what it returns.

    A user error (:data:`USER_ERRORS` and ``errors``) prints ``PROG: error: MESSAGE`` (in the
    CLI's option names: :func:`cli_message` with ``flags``) and returns 2; ``exit_on_error``
    raises ``SystemExit(2)`` instead, for a job whose ``main`` returns something other than a
    status.  With ``interrupted(args) -> message``, Ctrl-C prints ``PROG: MESSAGE`` (how to
    resume) and gives status 130 (``None``: raised on).
    """
    add_verbose_option(parser)
    args = parser.parse_args(argv)
    if not args.verbose and argv is None:  # a real command line; a test or notebook keeps its stderr
        from pipeline._quiet import silence_library_startup

        silence_library_startup()
    setup_logging(timestamps, verbose=args.verbose)
    try:
        return job(args)
    except KeyboardInterrupt:
        message = interrupted(args) if interrupted is not None else None
        if message is None:
            raise
        return _fail(parser, exit_on_error, 130, message)
    except USER_ERRORS + tuple(errors) as exc:
        return _fail(parser, exit_on_error, 2, f"error: {cli_message(parser, str(exc), flags)}")


def print_last(text: str) -> None:
    """Print the command's last line (what to open) after the filtered stderr has drained, so it
    stays last even when stdout and stderr are redirected to one file."""
    from pipeline._quiet import restore_stderr

    sys.stdout.flush()
    restore_stderr()
    print(text, flush=True)


def _fail(parser: argparse.ArgumentParser, exit_on_error: bool, status: int, message: str) -> int:
    if exit_on_error:
        parser.exit(status, f"{parser.prog}: {message}\n")
    print(f"{parser.prog}: {message}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------------------------
# data sets and label schemes (issue 12): the same options in every CLI that reads data
# --------------------------------------------------------------------------------------------

LABELS_HELP = ("label scheme: auto (default: bach4 for BACH's classes, benign/malignant for BreakHis, "
               "else the classes as found), classes (as found), bach4, bmc3, binary, breakhis2, breakhis8, "
               "or a mapping file (JSON: {\"coarse\": [\"fine\", ...], ...}) that merges classes")


def labels_spec(text: str) -> str:
    """argparse type of ``--labels``: a scheme name, or a mapping file that must exist."""
    from data.labels import SCHEMES
    from data.mapping import AUTO, CLASSES

    if text in (AUTO, CLASSES) or text in SCHEMES:
        return text
    if text.lower().endswith(".json") or os.sep in text or "/" in text:
        if not os.path.isfile(text):
            raise argparse.ArgumentTypeError(f"mapping file {text!r} does not exist")
        return text
    raise argparse.ArgumentTypeError(f"unknown label scheme {text!r}: use auto, classes, "
                                     f"{', '.join(SCHEMES)}, or a mapping file (.json)")


def mapping_file(text: str) -> str:
    """argparse type of a mapping file option (``--regroup``, ``--map``): it must exist."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"mapping file {text!r} does not exist")
    return text


def add_labels_option(parser: argparse.ArgumentParser, help: str = LABELS_HELP, regroup: bool = True) -> None:
    """``--labels`` (any scheme) and, with `regroup`, ``--regroup MAPPING`` (repeatable)."""
    parser.add_argument("--labels", default="auto", type=labels_spec, metavar="SCHEME_OR_MAPPING", help=help)
    if regroup:
        parser.add_argument("--regroup", action="append", type=mapping_file, default=[], metavar="MAPPING.json",
                            help="also report the predictions read through this mapping file (fine classes "
                            "-> coarse ones), next to the built-in groupings (bach4 -> bmc3, binary; BreakHis "
                            "subtypes -> benign/malignant); repeatable")


def add_data_options(parser: argparse.ArgumentParser, stores: bool = False) -> None:
    """``--magnification`` and ``--breakhis-patients`` (images of a data set; with `stores`, the
    patient option defaults to the groups stored at extraction)."""
    from data.breakhis import PATIENT_GROUPINGS

    parser.add_argument("--magnification", nargs="+", metavar="MAG",
                        help="keep only images of these magnifications (BreakHis: 40 100 200 400; from the "
                        "file names or a manifest 'magnification' column); one not in the data is an error")
    parser.add_argument("--breakhis-patients", default=None if stores else PATIENT_GROUPINGS[0],
                        choices=PATIENT_GROUPINGS,
                        help="patients of BreakHis file names: number (slides sharing a number, e.g. 14-22549AB "
                        "and 14-22549CD, are one patient: no leakage between folds) or slide (BreakHis's 82 ids, "
                        "as in Spanhol et al.'s protocol); default: "
                        + ("the groups stored by pipeline.extract (its default: number)" if stores else "number"))


def load_data(args: argparse.Namespace, source=None, scheme=None):
    """:func:`data.datasets.load_dataset` of ``args.data`` (or `source`) with the data options;
    copies of one image are logged and kept in one group."""
    from data.datasets import load_dataset

    return load_dataset(source if source is not None else args.data, scheme=scheme,
                        magnification=getattr(args, "magnification", None),
                        breakhis_patients=getattr(args, "breakhis_patients", None) or "number")
