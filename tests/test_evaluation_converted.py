"""A converted MHC checkpoint scores exactly like its source on the downstream suite (conversion is exact)."""

from __future__ import annotations

import pytest

from transformers_mhc.conversion import convert_llama_to_mhc
from transformers_mhc.evaluation import suite


@pytest.mark.parametrize("hyper_connection", ["mhc"])
def test_converted_mhc_scores_identically_to_the_original(
    stories260k_path, data_dir, tmp_path, hyper_connection
):
    converted = tmp_path / "stories-mhc"
    convert_llama_to_mhc(stories260k_path, converted, num_streams=4, hyper_connection=hyper_connection)

    def scores(model_path, trust_remote_code: bool) -> dict:
        report = suite.evaluate_model(
            str(model_path),
            tasks="bbh,gsm8k,mmlu",
            data_dir=data_dir,
            limit=1,
            max_gen_toks=4,
            batch_size=8,
            bootstrap_iters=0,
            trust_remote_code=trust_remote_code,
        )
        return {task: metrics for task, metrics in report["lm_eval"]["results"].items()}

    original = scores(stories260k_path, trust_remote_code=False)
    ours = scores(converted, trust_remote_code=True)
    assert original.keys() == ours.keys()
    assert len(original) > 80  # 27 BBH tasks + GSM8K + 57 MMLU subjects (+ groups)
    for task, metrics in original.items():
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        assert numeric == {k: ours[task][k] for k in numeric}, task
