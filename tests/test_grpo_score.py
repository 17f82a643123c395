"""scripts/score_rewards.py: the grpo rewards over a predictions file, and its located errors."""

from __future__ import annotations

import json

from chatft.grpo.score import main


def test_rewards_of_a_predictions_file(tmp_path, capsys):
    rows = [{"prompt": "p", "reference": "Answer: 4", "prediction": "Answer: 4"},
            {"prompt": "p", "reference": "Answer: 5", "prediction": "Answer: 6"},
            {"prompt": "p", "reference": "", "prediction": "no reference"}]  # fmt: skip
    path = tmp_path / "pred.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "--predictions",
                str(path),
                "--reward_funcs",
                "accuracy",
                "format",
                "--output",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r").read_text()) == {str(path): {"accuracy": 0.5, "format": 0.0}}
    assert f"{path}: accuracy 0.5, format 0.0" in capsys.readouterr().out


def test_a_line_without_a_prediction_is_located(tmp_path, capsys):
    path = tmp_path / "pred.jsonl"
    path.write_text(
        json.dumps({"prediction": "x", "reference": "x"}) + "\n" + json.dumps({"answer": "y"}) + "\n"
    )
    assert main(["--predictions", str(path)]) == 2
    assert f"error: {path}:2: needs string fields prediction and reference" in capsys.readouterr().err
