"""Test helpers for code that pushes to or pulls from the Hugging Face Hub, without the network.

`LoopbackHub` is a Hub-compatible HTTP server on 127.0.0.1 (the endpoints huggingface_hub,
transformers and peft use to create repos, commit, branch, list and download files, plus
/api/validate-yaml). Point the unmodified clients at it with HF_ENDPOINT and write with
DEFAULT_TOKEN; see LoopbackHub's docstring for an example and its supported API:

    from hf_hybrid_attn.testing import DEFAULT_TOKEN, LoopbackHub
    with LoopbackHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token=DEFAULT_TOKEN)
        api.create_repo("tester/demo")

`validate_card_metadata` applies the server's model-card metadata checks to a dict. The names
below are the supported API; needs only huggingface_hub's dependencies (PyYAML), not torch.
"""

from .hub_server import DEFAULT_TOKEN, DEFAULT_USER, LoopbackHub, git_blob_sha, validate_card_metadata

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "LoopbackHub", "git_blob_sha", "validate_card_metadata"]
