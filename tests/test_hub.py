"""`push_to_hub` with the real huggingface_hub client against a local stand-in of the Hub.

The stand-in (`tests/hub_server.py`) listens on 127.0.0.1 and answers the endpoints `create_repo` and
`upload_folder` call; `HF_ENDPOINT` (read when huggingface_hub is imported) points the client at it, so the
push runs in a subprocess with the environment set before import. Nothing is mocked on the client side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import BLOCK_PACKAGE
from hub_server import FakeHub, split_card, validate_model_card_metadata
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

import transformers_mhc.models
from transformers_mhc import (
    DecayLinearAttnConfig,
    DecayLinearAttnForCausalLM,
    DecayLinearAttnModel,
    MHCConfig,
    MHCForCausalLM,
    MHCModel,
)
from transformers_mhc.hub import add_subparser, build_model_card, complete_auto_map, push_to_hub, save_for_hub
from transformers_mhc_cli import COMMANDS

REPO_ID = "tester/tiny-mhc"
TOKEN = "dummy-token"
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_streams=2,
)
CODE_FILES = ("configuration_mhc.py", "modeling_mhc.py", "hyper_connection.py", "mhc_ops.py", "mhc_fused.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mhc.MHCConfig",
    "AutoModel": "modeling_mhc.MHCModel",
    "AutoModelForCausalLM": "modeling_mhc.MHCForCausalLM",
}
DECAY_TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    short_conv_size=4,
    attention_layers=[1],
)
DECAY_AUTO_MAP = {
    "AutoConfig": "configuration_decay_linear_attn.DecayLinearAttnConfig",
    "AutoModel": "modeling_decay_linear_attn.DecayLinearAttnModel",
    "AutoModelForCausalLM": "modeling_decay_linear_attn.DecayLinearAttnForCausalLM",
}
# model_type -> (config class, its tiny arguments, base model class, causal LM class, expected auto_map, a card tag)
FAMILIES = {
    "mhc": (MHCConfig, TINY, MHCModel, MHCForCausalLM, AUTO_MAP, "mhc"),
    "decay_linear_attn": (
        DecayLinearAttnConfig,
        DECAY_TINY,
        DecayLinearAttnModel,
        DecayLinearAttnForCausalLM,
        DECAY_AUTO_MAP,
        "decay-linear-attention",
    ),
}
SUBPROCESS_TIMEOUT = 180

# Builds the tiny model and a word-level tokenizer, records what should arrive, then pushes twice: once with
# the default card, once with a card carrying evaluation results (the repo then exists: `exist_ok=True`).
PUSH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from transformers_mhc import MHCConfig, MHCForCausalLM
    from transformers_mhc.hub import build_model_card, push_to_hub

    out, repo_id, tiny = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    torch.manual_seed(0)
    model = MHCForCausalLM(MHCConfig(**tiny)).eval()
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(tiny["vocab_size"] - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

    input_ids = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 7]])
    with torch.no_grad():
        logits = model(input_ids).logits
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out / "state.safetensors")
    save_file({"input_ids": input_ids, "logits": logits}, out / "logits.safetensors")

    first = push_to_hub(model, repo_id, tokenizer=tokenizer)
    card = build_model_card(model, model_id=repo_id, eval_results={"tinystories_recall": {"accuracy": 0.75}})
    second = push_to_hub(model, repo_id, tokenizer=tokenizer, card=card, commit_message="Add evaluation results")
    print(json.dumps({"first": first.oid, "second": second.oid, "url": second.commit_url}))
    """
)

# Loads the uploaded files in a process where `transformers_mhc` cannot be imported: only the code that
# travelled with the checkpoint is available (`trust_remote_code=True`).
RELOAD_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    """
    import json, sys

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder, expected = sys.argv[1], load_file(sys.argv[2])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    print(json.dumps({
        "config_class": type(config).__module__ + "." + type(config).__name__,
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "base_class": type(base).__name__,
        "max_abs_diff": (logits - expected["logits"]).abs().max().item(),
        "package_loaded": any(name.startswith("transformers_mhc") for name in sys.modules),
    }))
    """
)

# Loads saved folders in a process where `transformers_mhc` cannot be imported, saves them again with the plain
# `save_pretrained` (of the remote code's classes) and opens the result with `AutoModel`, which needs its entry.
RESAVE_SCRIPT = BLOCK_PACKAGE + textwrap.dedent(
    """
    import json, os, sys

    from transformers import AutoModel, AutoModelForCausalLM

    report = {}
    for folder in sys.argv[1:]:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).save_pretrained(folder + "-causal-lm")
        AutoModel.from_pretrained(folder, trust_remote_code=True).save_pretrained(folder + "-base")
        base = AutoModel.from_pretrained(folder + "-causal-lm", trust_remote_code=True)
        report[folder] = {
            saved: {
                "auto_map": json.load(open(folder + saved + "/config.json"))["auto_map"],
                "files": sorted(os.listdir(folder + saved)),
            }
            for saved in ("-causal-lm", "-base")
        }
        report[folder]["base_from_causal_lm"] = type(base).__name__
    report["package_loaded"] = any(name.startswith("transformers_mhc") for name in sys.modules)
    print(json.dumps(report))
    """
)

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import sys
    from huggingface_hub.errors import OfflineModeIsEnabled
    from transformers_mhc import MHCConfig, MHCForCausalLM
    from transformers_mhc.hub import push_to_hub

    model = MHCForCausalLM(MHCConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_streams=2))
    try:
        push_to_hub(model, sys.argv[1])
    except OfflineModeIsEnabled as error:
        print(f"OFFLINE: {error}")
        sys.exit(0)
    print("pushed despite HF_HUB_OFFLINE=1")
    sys.exit(1)
    """
)


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a client subprocess: the local endpoint, a dummy token, no Xet, isolated HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env.update(
        HF_ENDPOINT=endpoint,
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_XET="1",  # plain LFS uploads: what the stand-in implements
        HF_HOME=str(tmp_path / "hf_home"),  # no stored token or cache from the machine
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY=no_proxy,
        no_proxy=no_proxy,
    )
    env.update(extra)
    return env


def start_script(script: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Starts `script` in a fresh interpreter (the client reads its environment at import)."""
    path = cwd / "script.py"
    path.write_text(script, encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, str(path), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Waits (bounded) for a started script; kills it if it overruns."""
    try:
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{process.args} did not finish in {SUBPROCESS_TIMEOUT} s:\n{stdout}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_script(script: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return finish(start_script(script, args, env, cwd))


@pytest.fixture(scope="module")
def client_runs(tmp_path_factory):
    """Runs PUSH_SCRIPT and, side by side to save time, OFFLINE_SCRIPT, each against its own FakeHub.

    Yields a dict: `hub` and `push` (the FakeHub after the two pushes, the printed JSON), `workdir` (the
    expected tensors), `offline` (the offline run's CompletedProcess) and `offline_requests`.
    """
    workdir = tmp_path_factory.mktemp("push")
    offline_dir = tmp_path_factory.mktemp("offline")
    lifetime = 2 * SUBPROCESS_TIMEOUT  # the hubs stop by themselves even if the module hangs
    with (
        FakeHub(token=TOKEN, lifetime=lifetime) as hub,
        FakeHub(token=TOKEN, lifetime=lifetime) as offline_hub,
    ):
        push = start_script(
            PUSH_SCRIPT, [str(workdir), REPO_ID, json.dumps(TINY)], hub_env(workdir, hub.url), workdir
        )
        offline_env = hub_env(offline_dir, offline_hub.url, HF_HUB_OFFLINE="1")
        offline = start_script(OFFLINE_SCRIPT, [REPO_ID], offline_env, offline_dir)
        push_result, offline_result = finish(push), finish(offline)
        assert push_result.returncode == 0, (
            f"push failed:\n{push_result.stdout}\n{push_result.stderr[-4000:]}"
        )
        yield {
            "hub": hub,
            "push": json.loads(push_result.stdout.strip().splitlines()[-1]),
            "workdir": workdir,
            "offline": offline_result,
            "offline_requests": list(offline_hub.requests),
        }


@pytest.fixture(scope="module")
def pushed(client_runs):
    """(hub, printed JSON, folder with the expected tensors) of the PUSH_SCRIPT run."""
    return client_runs["hub"], client_runs["push"], client_runs["workdir"]


@pytest.fixture
def local_hub(monkeypatch):
    """A FakeHub for in-process clients: `HfApi()` reads `constants.ENDPOINT` when it is created."""
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        # Downloads build their URL from this template, made from HF_ENDPOINT at import.
        template = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        # No user-agent telemetry: it would fetch `/api/agent-harnesses` from the endpoint once per process.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield hub


def tiny_model() -> MHCForCausalLM:
    return MHCForCausalLM(MHCConfig(**TINY)).eval()


def tiny_family_model(model_type: str, base: bool = False):
    """The tiny causal LM (or, with `base`, the base model) of `model_type`."""
    config_class, kwargs, base_class, causal_lm_class, _, _ = FAMILIES[model_type]
    return (base_class if base else causal_lm_class)(config_class(**kwargs)).eval()


def tiny_tokenizer():
    """A word-level tokenizer over the 64 ids of the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# --- the push of PUSH_SCRIPT ------------------------------------------------------------------------
def test_push_creates_the_repo_and_commits_with_the_token(pushed):
    hub, printed, _ = pushed
    assert hub.unexpected == []
    assert hub.paths_requested()[0] == "POST /api/repos/create"
    # Every Hub request carries the token; the LFS PUT goes to the storage URL the batch answer gave, without it.
    assert {auth for _, path, auth in hub.requests if not path.startswith("/lfs-upload/")} == {
        f"Bearer {TOKEN}"
    }
    repo = hub.repos[REPO_ID]
    assert repo["private"] is False
    assert [commit["summary"] for commit in repo["commits"]] == [
        "Upload model with transformers-mhc",
        "Add evaluation results",
    ]
    assert [commit["oid"] for commit in repo["commits"]] == [printed["first"], printed["second"]]
    assert printed["url"].startswith(hub.url)


def test_push_uploads_config_with_auto_map(pushed):
    hub, _, _ = pushed
    config = json.loads(hub.files(REPO_ID)["config.json"])
    assert config["auto_map"] == AUTO_MAP
    assert config["model_type"] == "mhc"
    assert config["architectures"] == ["MHCForCausalLM"]
    assert config["num_streams"] == 2 and config["hyper_connection"] == "mhc"


def test_push_uploads_the_weights_through_lfs(pushed):
    hub, _, workdir = pushed
    first_commit = hub.repos[REPO_ID]["commits"][0]
    assert first_commit["modes"]["model.safetensors"] == "lfs"
    weights = hub.files(REPO_ID)["model.safetensors"]
    assert hashlib.sha256(weights).hexdigest() in hub.lfs_objects
    uploaded = load_safetensors(weights)
    expected = load_file(workdir / "state.safetensors")
    assert sorted(uploaded) == sorted(expected)
    assert any(".attn_hc." in name for name in uploaded) and any(".mlp_hc." in name for name in uploaded)
    for name, tensor in expected.items():
        assert torch.equal(uploaded[name], tensor), name


def test_push_uploads_the_model_code_inline(pushed):
    hub, _, _ = pushed
    files = hub.files(REPO_ID)
    package_models = Path(transformers_mhc.models.__file__).parent
    for name in CODE_FILES:
        assert files[name] == (package_models / name).read_bytes(), name
        assert hub.repos[REPO_ID]["commits"][0]["modes"][name] == "regular"


def test_push_uploads_tokenizer_and_generation_config(pushed):
    hub, _, _ = pushed
    files = hub.files(REPO_ID)
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert json.loads(files["generation_config.json"])["eos_token_id"] == 2


def test_push_uploads_a_card_with_valid_metadata(pushed):
    hub, _, _ = pushed
    # The client asked the server to validate README.md before hashing anything, and it was valid.
    assert hub.validated and all(errors == [] for _, errors in hub.validated)
    readme = hub.files(REPO_ID)["README.md"].decode("utf-8")
    assert validate_model_card_metadata(readme) == []
    metadata, body = split_card(readme)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0"
    assert {"mhc", "hyper-connections", "custom_code"} <= set(metadata["tags"])
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in body
    # The second push replaced the card by one with evaluation results: they parse back from model-index.
    card = ModelCard(readme)
    assert card.data.model_name == REPO_ID
    [result] = card.data.eval_results
    assert (result.dataset_type, result.metric_type, result.metric_value) == (
        "tinystories_recall",
        "accuracy",
        0.75,
    )


def test_pushed_repo_loads_with_remote_code_only(pushed, tmp_path):
    hub, _, workdir = pushed
    folder = tmp_path / "tiny-mhc"
    folder.mkdir()
    for name, content in hub.files(REPO_ID).items():
        (folder / name).write_bytes(content)
    result = run_script(
        RELOAD_SCRIPT,
        [str(folder), str(workdir / "logits.safetensors")],
        hub_env(tmp_path, "http://127.0.0.1:9"),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package_loaded"] is False
    assert report["config_class"].startswith("transformers_modules.") and report["config_class"].endswith(
        ".MHCConfig"
    )
    assert report["model_class"].endswith(".MHCForCausalLM") and report["base_class"] == "MHCModel"
    assert report["max_abs_diff"] <= 1e-6


# --- offline mode and refusals ----------------------------------------------------------------------
def test_push_with_hf_hub_offline_raises_before_any_request(client_runs):
    result = client_runs["offline"]
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    message = result.stdout.strip().splitlines()[-1]
    assert message.startswith("OFFLINE: ")
    assert REPO_ID in message and "HF_HUB_OFFLINE" in message
    assert client_runs["offline_requests"] == []


def test_push_rejects_invalid_card_metadata_before_uploading(local_hub):
    card = ModelCard("---\nlicense: not-a-license\n---\n\n# broken card\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        push_to_hub(tiny_model(), REPO_ID, card=card, token=TOKEN)
    assert local_hub.repos[REPO_ID]["commits"] == []
    assert local_hub.lfs_objects == {}
    assert local_hub.paths_requested() == ["POST /api/repos/create", "POST /api/validate-yaml"]


def test_push_with_a_wrong_token_is_refused(local_hub):
    with pytest.raises(HfHubHTTPError) as error:
        push_to_hub(tiny_model(), REPO_ID, token="wrong-token")
    assert error.value.response.status_code == 401
    assert local_hub.repos == {}


def test_push_rejects_an_invalid_repo_id_without_any_request(local_hub):
    with pytest.raises(HFValidationError):
        push_to_hub(tiny_model(), "not a/valid//repo id", token=TOKEN)
    assert local_hub.requests == []


def test_push_private_repo_fills_the_repo_id_into_a_card_made_without_it(local_hub):
    card = build_model_card(tiny_model(), extra_notes="Trained on nothing.")
    push_to_hub(tiny_model(), "tester/private-mhc", card=card, private=True, token=TOKEN)
    assert local_hub.repos["tester/private-mhc"]["private"] is True
    files = local_hub.files("tester/private-mhc")
    assert "model.safetensors" in files
    readme = files["README.md"].decode()
    assert 'from_pretrained("tester/private-mhc", trust_remote_code=True)' in readme
    assert "path/to/model" not in readme and "Trained on nothing." in readme
    assert (
        'from_pretrained("path/to/model", trust_remote_code=True)' in card.text
    )  # the caller's card is unchanged


def test_push_decay_linear_attention_model(local_hub):
    models = pytest.importorskip("transformers_mhc.models.modeling_decay_linear_attn")
    config = models.DecayLinearAttnConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        short_conv_size=4, attention_layers=[1],
    )  # fmt: skip
    push_to_hub(models.DecayLinearAttnForCausalLM(config), "tester/tiny-decay", token=TOKEN)
    files = local_hub.files("tester/tiny-decay")
    assert json.loads(files["config.json"])["auto_map"] == {
        "AutoConfig": "configuration_decay_linear_attn.DecayLinearAttnConfig",
        "AutoModel": "modeling_decay_linear_attn.DecayLinearAttnModel",
        "AutoModelForCausalLM": "modeling_decay_linear_attn.DecayLinearAttnForCausalLM",
    }
    assert {
        "configuration_decay_linear_attn.py",
        "modeling_decay_linear_attn.py",
        "model.safetensors",
    } <= set(files)
    readme = files["README.md"].decode()
    assert validate_model_card_metadata(readme) == []
    assert "decay-linear-attention" in split_card(readme)[0]["tags"]


# --- model.push_to_hub and save_pretrained(push_to_hub=True) -----------------------------------------
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_model_push_to_hub_uploads_our_card_and_the_full_auto_map(local_hub, model_type):
    repo_id = f"tester/method-{model_type.replace('_', '-')}"
    model = tiny_family_model(model_type)
    info = model.push_to_hub(repo_id, token=TOKEN, tags=["my-tag"], commit_message="First version")
    files = local_hub.files(repo_id)
    auto_map = FAMILIES[model_type][4]
    assert json.loads(files["config.json"])["auto_map"] == auto_map
    assert {name.split(".")[0] + ".py" for name in auto_map.values()} <= set(files)
    readme = files["README.md"].decode()
    assert validate_model_card_metadata(readme) == []
    metadata, body = split_card(readme)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"transformers-mhc", FAMILIES[model_type][5], "custom_code", "my-tag"} <= set(metadata["tags"])
    assert f'AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)' in body
    assert "automatically generated" not in readme  # transformers' placeholder card
    [commit] = local_hub.repos[repo_id]["commits"]
    assert commit["summary"] == "First version" and commit["oid"] == info.oid
    assert local_hub.unexpected == []


def test_model_push_to_hub_keeps_the_card_the_repo_has(local_hub):
    repo_id = "tester/edited-mhc"
    api = HfApi(token=TOKEN)
    api.create_repo(repo_id)
    api.upload_file(
        path_or_fileobj=b"---\nlicense: mit\n---\n\n# Edited on the Hub\n",
        path_in_repo="README.md",
        repo_id=repo_id,
    )
    tiny_model().push_to_hub(repo_id, token=TOKEN, tags=["my-tag"])
    files = local_hub.files(repo_id)
    metadata, body = split_card(files["README.md"].decode())
    assert body.strip() == "# Edited on the Hub"  # as transformers' push_to_hub: the repo's card stays
    assert metadata == {"license": "mit", "tags": ["my-tag"]}
    assert json.loads(files["config.json"])["auto_map"] == AUTO_MAP
    assert [commit["summary"] for commit in local_hub.repos[repo_id]["commits"]][
        -1
    ] == "Upload model with transformers-mhc"


def test_save_pretrained_with_push_to_hub_uploads_our_card(local_hub, tmp_path):
    folder = tmp_path / "saved-mhc"
    tiny_model().save_pretrained(folder, push_to_hub=True, repo_id="tester/saved-mhc", token=TOKEN)
    files = local_hub.files("tester/saved-mhc")
    assert json.loads(files["config.json"])["auto_map"] == AUTO_MAP
    assert 'from_pretrained("tester/saved-mhc", trust_remote_code=True)' in files["README.md"].decode()
    assert 'from_pretrained("path/to/model", trust_remote_code=True)' in (folder / "README.md").read_text()
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()


# --- saving -----------------------------------------------------------------------------------------
def test_save_for_hub_writes_the_given_card_and_auto_map(tmp_path):
    card = ModelCard("---\nlicense: mit\n---\n\n# card\n")
    folder = save_for_hub(tiny_model(), tmp_path / "hub", card=card)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert (folder / "README.md").read_text() == str(card)  # not replaced by the card save_pretrained writes
    assert {name: config[name] for name in ("num_streams", "hidden_size")} == {
        "num_streams": 2,
        "hidden_size": 32,
    }
    for name in (*CODE_FILES, "model.safetensors", "README.md"):
        assert (folder / name).is_file(), name


@pytest.mark.parametrize("base", [False, True], ids=["causal_lm", "base_model"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_save_pretrained_writes_the_full_auto_map_and_our_card(tmp_path, model_type, base):
    model = tiny_family_model(model_type, base=base)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == FAMILIES[model_type][4]
    assert config["architectures"] == [type(model).__name__]
    readme = tmp_path / "README.md"
    assert validate_model_card_metadata(readme.read_text()) == []
    metadata, body = split_card(readme.read_text())
    assert {"transformers-mhc", FAMILIES[model_type][5], "custom_code"} <= set(metadata["tags"])
    assert 'AutoModelForCausalLM.from_pretrained("path/to/model", trust_remote_code=True)' in body
    assert os.stat(readme).st_mode & 0o777 == 0o666 & ~current_umask()


def test_save_pretrained_keeps_an_existing_card(tmp_path):
    (tmp_path / "README.md").write_text("# My own card\n")
    tiny_model().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My own card\n"


def test_complete_auto_map_completes_a_folder_saved_without_it(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["auto_map"]["AutoModel"]  # what earlier versions wrote
    (tmp_path / "config.json").write_text(json.dumps(config))
    complete_auto_map(tmp_path, model)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_save_pretrained_after_a_remote_code_load_writes_the_full_auto_map(tmp_path):
    folders = []
    for model_type in FAMILIES:
        folders.append(str(tmp_path / model_type))
        tiny_family_model(model_type).save_pretrained(folders[-1])
    result = run_script(RESAVE_SCRIPT, folders, hub_env(tmp_path, "http://127.0.0.1:9"), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["package_loaded"] is False
    for folder, model_type in zip(folders, FAMILIES):
        _, _, base_class, _, auto_map, _ = FAMILIES[model_type]
        for saved in ("-causal-lm", "-base"):
            assert report[folder][saved]["auto_map"] == auto_map, (model_type, saved)
            # Without the package, no card: transformers' own behaviour (the code travels all the same).
            assert "README.md" not in report[folder][saved]["files"]
            assert {name.split(".")[0] + ".py" for name in auto_map.values()} <= set(
                report[folder][saved]["files"]
            )
        assert report[folder]["base_from_causal_lm"] == base_class.__name__


def test_save_for_hub_rejects_non_transformers_models(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_for_hub(torch.nn.Linear(2, 2), tmp_path)


# --- command line -----------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="transformers-mhc")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_registers_the_hub_subcommands():
    assert COMMANDS["push"][0] == "transformers_mhc.hub"


def test_cli_push_with_lm_eval_results(local_hub, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    results = {
        "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.02}},
        "configs": {
            "arc_easy": {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", "test_split": "test"}
        },
        "n-shot": {"arc_easy": 0},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    argv = ["push", str(folder), "tester/cli-mhc", "--private", "--token", TOKEN]
    assert run_cli([*argv, "--eval-results", str(tmp_path / "results.json")]) == 0
    assert "tester/cli-mhc" in capsys.readouterr().out

    files = local_hub.files("tester/cli-mhc")
    assert local_hub.repos["tester/cli-mhc"]["private"] is True
    assert json.loads(files["config.json"])["auto_map"] == AUTO_MAP
    assert set(CODE_FILES) <= set(files)
    readme = files["README.md"].decode()
    assert validate_model_card_metadata(readme) == []
    [result] = ModelCard(readme).data.eval_results
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == (
        "allenai/ai2_arc",
        "ARC-Easy",
        "test",
    )
    assert (result.metric_type, result.metric_value, result.dataset_args) == ("acc", 0.5, {"num_few_shot": 0})


def test_cli_push_reports_errors(local_hub, tmp_path, capsys):
    assert run_cli(["push", str(tmp_path / "missing"), "tester/x", "--token", TOKEN]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert local_hub.requests == []


def test_cli_push_uploads_the_folder_as_it_is_without_loading_the_model(
    local_hub, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    tokenizer_files = {Path(name).name for name in tiny_tokenizer().save_pretrained(folder)}
    # Written by an earlier version: no AutoModel in auto_map. The other files are not for the repository.
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "mhc_conversion.json").write_text(json.dumps({"output": str(folder)}))
    (folder / "train.py").write_text("print('not model code')\n")
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "model.safetensors").write_bytes(b"old")
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}

    def no_loading(*args, **kwargs):
        raise AssertionError("push loaded the model although the folder can be uploaded as it is")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    assert run_cli(["push", str(folder), "tester/folder-mhc", "--token", TOKEN]) == 0
    assert "tester/folder-mhc" in capsys.readouterr().out

    files = local_hub.files("tester/folder-mhc")
    code_files = {"hub_mixin.py", *CODE_FILES}
    assert set(files) == {"README.md", "config.json", "generation_config.json", "model.safetensors"} | (
        code_files | tokenizer_files
    )
    for name in set(files) - {"README.md", "config.json"}:
        assert files[name] == before[name], name
    assert json.loads(files["config.json"])["auto_map"] == AUTO_MAP
    assert 'from_pretrained("tester/folder-mhc", trust_remote_code=True)' in files["README.md"].decode()
    assert {
        path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()
    } == before  # untouched


def test_cli_push_reloads_a_folder_that_lacks_model_code(local_hub, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    (folder / "mhc_ops.py").unlink()
    assert run_cli(["push", str(folder), "tester/reloaded-mhc", "--token", TOKEN]) == 0
    assert "mhc_ops.py" in capsys.readouterr().err
    files = local_hub.files("tester/reloaded-mhc")
    package_models = Path(transformers_mhc.models.__file__).parent
    assert files["mhc_ops.py"] == (package_models / "mhc_ops.py").read_bytes()
    assert json.loads(files["config.json"])["auto_map"] == AUTO_MAP


def test_cli_push_offline_prints_one_error_line(tmp_path):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    with FakeHub(token=TOKEN) as hub:
        result = subprocess.run(
            [sys.executable, "-m", "transformers_mhc.cli", "push", str(folder), REPO_ID],
            env=hub_env(tmp_path, hub.url, HF_HUB_OFFLINE="1"),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
        )
        assert hub.requests == []
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("transformers-mhc push: error: ") and "HF_HUB_OFFLINE" in line


def test_cli_push_to_an_unreachable_endpoint_prints_one_error_line(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    capsys.readouterr()  # the progress bar of save_pretrained
    assert run_cli(["push", str(folder), REPO_ID, "--token", TOKEN]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("transformers-mhc push: error: cannot reach the Hub at http://127.0.0.1:9")
