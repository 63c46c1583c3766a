"""The argument types every subcommand shares: a count, a port or a number of seconds out of range stops
at the command line with argparse's one-line error naming the option, before a model is loaded."""
from __future__ import annotations

import argparse

import pytest

from packformer.cli import build_parser, main
from packformer.commands.common import NON_NEGATIVE, PORT, POSITIVE, POSITIVE_NUMBER, finite_number, int_in


def test_int_in_takes_its_range_and_names_what_is_wrong():
    assert POSITIVE("3") == 3 and NON_NEGATIVE("0") == 0 and PORT("0") == 0 and PORT("65535") == 65535
    assert int_in(2, 4)("4") == 4
    for parse, text, msg in ((POSITIVE, "0", "must be at least 1, got 0"),
                             (NON_NEGATIVE, "-1", "at least 0, got -1"),
                             (PORT, "65536", "between 0 and 65535, got 65536"),
                             (POSITIVE, "2.5", "an integer, got '2.5'")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse(text)


def test_finite_number_refuses_nan_inf_and_the_wrong_sign():
    assert POSITIVE_NUMBER("0.5") == 0.5 and finite_number(positive=False)("0") == 0.0
    for text in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            POSITIVE_NUMBER(text)


@pytest.mark.parametrize("argv, msg", [
    (["encode", "--max-batch-tokens", "0", "a"], "argument --max-batch-tokens: must be at least 1, got 0"),
    (["encode", "--batch-size", "-2", "a"], "argument --batch-size: must be at least 1, got -2"),
    (["bench", "--iterations", "0"], "argument --iterations: must be at least 1, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["rerank", "--top-k", "0", "-q", "q", "a"], "argument --top-k: must be at least 1, got 0"),
    (["embed-dataset", "--replicas", "0", "-i", "in.parquet", "-o", "out"],
     "argument --replicas: must be at least 1, got 0"),
    (["serve", "--port", "-1"], "argument --port: must be between 0 and 65535, got -1"),
])
def test_a_bad_count_stops_at_the_command_line(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_zero_stays_valid_where_it_means_something():
    parse = build_parser().parse_args
    assert parse(["bench", "--max-seconds", "0"]).max_seconds == 0            # 0: never stop a peer early
    assert parse(["tutorial", "--profile-iterations", "0"]).profile_iterations == 0     # no profiler tables
    assert parse(["serve", "--port", "0"]).port == 0                            # any free port
    assert parse(["embed-dataset", "-i", "in.parquet", "-o", "out", "--gpus-per-replica", "0"]).gpus_per_replica == 0
