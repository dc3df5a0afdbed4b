"""What other APIs' clients send, mapped onto our schema or refused by name (server.compat), without
a server: the e2e tests drive the same through real sockets."""

from __future__ import annotations

import base64
import json

import pytest

from tests.conftest import EXAMPLE_IMAGE
from wan_spmd.params import Limits
from wan_spmd.server.compat import adapt_request, fold_brackets
from wan_spmd.server.errors import ApiError

PNG = EXAMPLE_IMAGE.read_bytes()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def adapt(fields: dict, image: bytes | None = None):
    return adapt_request(dict(fields), image, Limits())


def test_mapped_fields_keep_their_meaning():
    """vllm-omni's `true_cfg_scale` is our guidance_scale (unless that is given), its `video_params`
    block fills what the top level leaves out, OpenAI's `{"image_url": data URL}` reference (a JSON
    object, its text in a form field, or the SDK's bracketed form fields) is the image, and n=1,
    generate_sound=false, quality=default change nothing. If this fails, those clients' requests
    are refused or mean something else here."""
    fields, image, notes = adapt(
        {
            "prompt": "x",
            "true_cfg_scale": "4",
            "fps": "12",
            "video_params": {"fps": 8, "num_frames": 9},
            "image_reference": json.dumps({"image_url": DATA_URL}),
            "n": "1",
            "generate_sound": "false",
            "quality": "default",
        }
    )
    assert fields == {"prompt": "x", "guidance_scale": "4", "fps": "12", "num_frames": 9} and image == PNG
    assert notes == ["true_cfg_scale used as guidance_scale (Wan's classifier-free guidance)"]
    _, _, notes = adapt({"prompt": "x", "true_cfg_scale": 4, "guidance_scale": 3})
    assert notes == ["ignored true_cfg_scale: guidance_scale was given too and wins"]
    assert fold_brackets({"input_reference[image_url]": DATA_URL, "a": 1}) == {
        "input_reference": {"image_url": DATA_URL},
        "a": 1,
    }
    assert adapt({"prompt": "x", "input_reference[image_url]": DATA_URL})[1] == PNG


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"lora": {"name": "x"}}, "lora", "fused when the server starts"),
        ({"extra_params": '{"a": 1}'}, "extra_params", "not supported"),
        ({"extra_body": {"seed": 1}}, "extra_body", "top level"),
        ({"video_reference": "v"}, "video_reference", "not from another video"),
        ({"reference_url": "https://x/y.png"}, "reference_url", "never fetched"),
        ({"n": 2}, "n", "must be 1"),
        ({"num_outputs_per_prompt": "3"}, "num_outputs_per_prompt", "must be 1"),
        ({"generate_sound": True}, "generate_sound", "no audio"),
        ({"stream": "true"}, "stream", "not streamed"),
        ({"quality": "hd"}, "quality", "not offered"),
        ({"image_reference": {"file_id": "file_1"}}, "image_reference", "no file store"),
        ({"input_reference": {"file_id": "file_1"}}, "input_reference", "no file store"),
        ({"image_reference": {"image_url": "https://x/y.png"}}, "image_reference", "not fetched"),
        ({"video_params": {"seconds": 4}}, "video_params", "not supported"),
        ({"generate_sound": "perhaps"}, "generate_sound", "true or false"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(fields, param, words):
    """Each field that would change the video and that we cannot honour is a 400 naming it, never
    dropped: if this fails, a client gets a video it did not ask for."""
    with pytest.raises(ApiError) as refused:
        adapt({"prompt": "x", **fields})
    assert (refused.value.status, refused.value.param) == (400, param) and words in refused.value.message


def test_one_image_per_job():
    """An upload and a reference together are a 400 (which one would win is a guess)."""
    with pytest.raises(ApiError, match="one input image"):
        adapt({"prompt": "x", "image_reference": {"image_url": DATA_URL}}, image=PNG)
