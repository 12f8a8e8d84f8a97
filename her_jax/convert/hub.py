"""Publish an exported HF folder to the Hugging Face Hub.

The token comes from the environment (`HF_TOKEN`) or the login cache huggingface_hub keeps; it is
handed to the client only and never printed, logged or written into the folder.
"""

from __future__ import annotations

import os

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError


class HubError(RuntimeError):
    """Publishing could not start or failed; says what to do."""


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                commit_message: str = "Upload Qwen3 model exported by her_jax", api=None) -> str:
    """Create `repo_id` if needed and upload `folder` to it; returns the repository URL."""
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise HubError(f"{folder}: not an HF model folder (no config.json); export it with `to-hf` first")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"repo id {repo_id!r}: expected 'owner/name'")
    if api is None:
        token = huggingface_hub.get_token()
        if not token:
            raise HubError("no Hugging Face token found: set HF_TOKEN in the environment "
                           "(or log in with `hf auth login`)")
        api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message)
    except HfHubHTTPError as e:
        raise HubError(f"uploading {folder} to {repo_id} failed: {e}") from None
    return str(url)
