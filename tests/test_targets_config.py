"""``LoRAConfig.target_modules`` means what ``jlora.apply`` makes of it (JAX layer names,
``"all-linear"``, fused ``qkv_proj``/``gate_up_proj`` layers) all the way to the slot banks: an
adapter the wrapped model serves is added, one that targets a layer the model does not LoRA is
refused with that module named."""

import pytest
from conftest import ADAPTERS_DIR, FIXTURES

import jlora
import jlora.manager as mgr
from jlora.engine import Engine
from jlora.errors import AdapterMismatchError
from jlora.models import llama

ATTN = jlora.LoRARequest(lora_name="attn", lora_int_id=1, lora_path=ADAPTERS_DIR / "attn_r8")


@pytest.fixture(scope="module")
def models():
    return {
        fuse: llama.from_pretrained(FIXTURES / "tiny_llama", fuse_qkv=fuse)
        for fuse in (False, True)
    }


def _state(model, target_modules):
    config = jlora.LoRAConfig(max_loras=2, max_lora_rank=16, target_modules=target_modules)
    return mgr.init_state(config, jlora.find_targets(jlora.apply(model, config)))


@pytest.mark.parametrize(
    "target_modules, fused",
    [
        ("all-linear", False),
        ("all-linear", True),
        (("qkv_proj", "o_proj"), True),
        (("q_proj", "k_proj", "v_proj", "o_proj"), True),  # PEFT's names pick the fused layer
        (r".*\.(q|k|v|o)_proj", False),
        (r".*\.(q|k|v|o)_proj", True),
    ],
)
def test_an_adapter_the_wrapped_model_serves_is_added(models, target_modules, fused):
    state = mgr.add_adapter(_state(models[fused], target_modules), ATTN)
    assert 1 in state.cache


def test_an_adapter_beyond_the_wrapped_targets_names_its_module(models):
    state = _state(models[True], ("qkv_proj",))  # attn_r8 also targets o_proj
    with pytest.raises(AdapterMismatchError, match=r"self_attn\.o_proj"):
        mgr.add_adapter(state, ATTN)


def test_engine_with_all_linear_targets_serves_an_adapter(models):
    engine = Engine(
        models[True],
        jlora.LoRAConfig(max_loras=2, max_lora_rank=16, target_modules="all-linear"),
        max_batch=2,
        max_seq_len=48,
    )
    engine.add_lora(ATTN)
