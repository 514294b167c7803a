"""The GPU path's pure logic, with made-up NVML and onnxruntime device lists (workers/devices.py,
workers/launch.py, models/adapters/onnx.py, tools/onnxruntime_build.py)."""

from __future__ import annotations

import pytest

from models.adapters.base import RuntimeOptions
from models.adapters.onnx import provider_options
from tools.onnxruntime_build import CPU_BUILD, GPU_BUILD, choose_build, requirement
from workers.devices import CPU, CUDA, TENSORRT, DeviceError, NvmlDevice, place, select_gpus, visible_devices
from workers.launch import worker_commands

# Three cards in NVML's (PCI bus) order; UUIDs share no prefix but "GPU-".
A = NvmlDevice(0, "GPU-aaaa1111-0000-0000-0000-000000000000", "NVIDIA H200", 143771)
B = NvmlDevice(1, "GPU-bbbb2222-0000-0000-0000-000000000000", "NVIDIA H200", 143771)
C = NvmlDevice(2, "GPU-cccc3333-0000-0000-0000-000000000000", "NVIDIA L4", 23034)
HOST = [C, A, B]  # in any order: NVML's index decides
GPU_BUILD_PROVIDERS = [TENSORRT, CUDA, CPU]
CPU_BUILD_PROVIDERS = ["AzureExecutionProvider", CPU]


# --- CUDA_VISIBLE_DEVICES as CUDA reads it ---------------------------------------------------


def test_unset_means_every_gpu_in_nvml_order():
    assert visible_devices(None, HOST) == [A, B, C]


def test_indices_and_uuids_and_uuid_prefixes_name_the_same_cards():
    assert visible_devices("2,0", HOST) == [C, A]
    assert visible_devices(f"{C.uuid},{A.uuid}", HOST) == [C, A]
    assert visible_devices("GPU-cccc,GPU-aa", HOST) == [C, A]


def test_the_list_ends_at_the_first_entry_that_names_no_card_or_one_named_again():
    assert visible_devices("1,7,0", HOST) == [B]
    assert visible_devices("1,1,0", HOST) == [B]
    assert visible_devices("GPU-,0", HOST) == []  # "GPU-" alone is a prefix of every card: ambiguous
    assert visible_devices("", HOST) == []
    assert visible_devices("MIG-1234", HOST) == []


def test_integer_entries_without_pci_bus_order_are_refused_on_a_multi_gpu_host():
    with pytest.raises(DeviceError, match="PCI_BUS_ID"):
        visible_devices("1", HOST, pci_order=False)
    with pytest.raises(DeviceError, match="PCI_BUS_ID"):
        visible_devices(None, HOST, pci_order=False)
    assert visible_devices(B.uuid, HOST, pci_order=False) == [B]  # a UUID needs no order
    assert visible_devices("0", [A], pci_order=False) == [A]  # one card: one order


# --- the placement a worker gets ----------------------------------------------------------------


def test_the_gate_and_the_providers_watch_the_same_card_under_cuda_visible_devices():
    # CUDA ordinal 1 among "2,0" is NVML's card 0 (A), not NVML's card 1 (B).
    placement = place("auto", 1, (), "2,0", HOST, GPU_BUILD_PROVIDERS)
    assert placement.gpu == A
    assert placement.cuda_device_id == 1
    assert placement.providers == (CUDA, CPU)
    assert not placement.providers_required
    assert placement.describe()["device"] == f"cuda:1 NVIDIA H200 {A.uuid}"


def test_a_worker_pinned_by_uuid_sees_its_card_as_cuda_zero():
    placement = place("cuda", 0, (), C.uuid, HOST, GPU_BUILD_PROVIDERS)
    assert (placement.gpu, placement.cuda_device_id, placement.providers, placement.providers_required) == (
        C,
        0,
        (CUDA,),
        True,
    )


def test_auto_runs_on_cpu_without_a_gpu_or_without_the_gpu_build():
    assert place("auto", 0, (), None, [], GPU_BUILD_PROVIDERS).providers == (CPU,)
    no_build = place("auto", 0, (), None, HOST, CPU_BUILD_PROVIDERS)
    assert (no_build.gpu, no_build.providers) == (None, (CPU,))  # the gate then reads host memory
    assert "no CUDA provider" in no_build.reason
    out_of_range = place("auto", 3, (), None, HOST, GPU_BUILD_PROVIDERS)
    assert out_of_range.gpu is None and out_of_range.providers == (CPU,)
    # A CUDA-first MASKQ_ORT_PROVIDERS on a CPU host keeps what can run.
    assert place("auto", 0, (TENSORRT, CUDA, CPU), None, [], CPU_BUILD_PROVIDERS).providers == (CPU,)


def test_cuda_without_a_gpu_requires_cuda_so_models_fail_to_load_visibly():
    placement = place("cuda", 0, (), None, [], CPU_BUILD_PROVIDERS)
    assert placement.providers == (CUDA,) and placement.providers_required
    assert placement.gpu is None and "no GPU 0 is visible" in placement.reason
    assert "install onnxruntime-gpu" in place("cuda", 0, (), None, HOST, CPU_BUILD_PROVIDERS).reason


def test_cpu_ignores_every_gpu():
    placement = place("cpu", 0, (CUDA,), "0", HOST, GPU_BUILD_PROVIDERS)
    assert (placement.gpu, placement.providers, placement.providers_required) == (None, (CPU,), False)


def test_configured_providers_win_on_a_gpu():
    assert place("auto", 0, (TENSORRT, CUDA, CPU), None, HOST, GPU_BUILD_PROVIDERS).providers == (TENSORRT, CUDA, CPU)


def test_an_unknown_device_setting_is_refused():
    with pytest.raises(DeviceError):
        place("gpu", 0, (), None, HOST, GPU_BUILD_PROVIDERS)


def test_tensorrt_engines_are_cached_per_gpu_model():
    assert A.cache_key == B.cache_key == "NVIDIA-H200"
    assert C.cache_key == "NVIDIA-L4"


# --- MASKQ_GPUS and the launcher ---------------------------------------------------------------


def test_maskq_gpus_selects_by_index_uuid_or_all():
    assert select_gpus("", HOST) == [] and select_gpus("none", HOST) == []
    assert select_gpus("all", HOST) == [A, B, C]
    assert select_gpus("2, 0", HOST) == [C, A]
    assert select_gpus("GPU-bbbb", HOST) == [B]


@pytest.mark.parametrize(
    ("setting", "message"), [("3", "no GPU of this host"), ("0,0", "twice"), ("GPU-zzzz", "no GPU of this host")]
)
def test_maskq_gpus_naming_no_card_is_refused_with_what_there_is(setting, message):
    with pytest.raises(DeviceError, match=message) as refused:
        select_gpus(setting, HOST)
    if "twice" not in message:
        assert A.uuid in str(refused.value)


def test_all_on_a_host_without_gpus_is_refused():
    with pytest.raises(DeviceError, match="no GPU"):
        select_gpus("all", [])


def test_the_launcher_pins_one_worker_per_gpu_by_uuid_and_names_each():
    commands = worker_commands(
        [A, C],
        ["-Q", "interactive,default,batch"],
        {"PATH": "/bin", "MASKQ_GPUS": "all"},
        "/venv/bin/celery",
        metrics_port=9808,
    )
    assert [argv for argv, _ in commands] == [
        ["/venv/bin/celery", "-A", "workers.celery_app", "worker", "-Q", "interactive,default,batch", "-n", "gpu0@%h"],
        ["/venv/bin/celery", "-A", "workers.celery_app", "worker", "-Q", "interactive,default,batch", "-n", "gpu2@%h"],
    ]
    for (_, env), gpu, port in zip(commands, [A, C], ["9808", "9809"]):
        assert env["CUDA_VISIBLE_DEVICES"] == gpu.uuid
        assert env["MASKQ_WORKER_METRICS_PORT"] == port  # each its own metrics port
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["MASKQ_GPU_DEVICE_INDEX"] == "0"
        assert env["MASKQ_GPUS"] == ""  # a worker does not launch workers
        assert env["PATH"] == "/bin"
        # What the worker then computes for itself agrees: its one visible card, as CUDA 0.
        placement = place("auto", 0, (), env["CUDA_VISIBLE_DEVICES"], HOST, GPU_BUILD_PROVIDERS)
        assert (placement.gpu, placement.cuda_device_id) == (gpu, 0)


def test_the_launcher_keeps_a_given_node_name_unique_per_gpu():
    [(argv, _)] = worker_commands([B], ["-n", "infer@%h", "-c", "1"], {}, "celery")
    assert argv[-4:] == ["-n", "gpu1-infer@%h", "-c", "1"]
    [(argv, _)] = worker_commands([B], ["--hostname=infer@%h"], {}, "celery")
    assert argv[-1] == "--hostname=gpu1-infer@%h"


# --- what the providers are given ---------------------------------------------------------------


def test_cuda_gets_its_device_a_capped_arena_that_grows_by_what_is_asked():
    runtime = RuntimeOptions(device_id=1, gpu_mem_limit_mb=768)
    assert provider_options(CUDA, runtime) == {
        "device_id": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "gpu_mem_limit": str(768 * 2**20),
    }
    assert "gpu_mem_limit" not in provider_options(CUDA, RuntimeOptions())


def test_tensorrt_gets_its_device_fp16_and_engine_and_timing_caches():
    runtime = RuntimeOptions(device_id=2, fp16=True, trt_cache_dir="/var/trt/NVIDIA-H200/onnxruntime-1.31.1/sam-1")
    options = provider_options(TENSORRT, runtime)
    assert options["device_id"] == "2" and options["trt_fp16_enable"] == "True"
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == runtime.trt_cache_dir
    assert "trt_engine_cache_enable" not in provider_options(TENSORRT, RuntimeOptions())
    assert provider_options(CPU, runtime) == {}


# --- which onnxruntime build `make install` puts in ----------------------------------------------


@pytest.mark.parametrize(
    ("device", "driver", "build"),
    [
        ("auto", True, GPU_BUILD),
        ("auto", False, CPU_BUILD),
        ("", False, CPU_BUILD),
        ("cuda", False, GPU_BUILD),
        ("cuda", True, GPU_BUILD),
        ("CPU", True, CPU_BUILD),
        ("cpu", False, CPU_BUILD),
    ],
)
def test_the_install_chooses_one_build(device, driver, build):
    assert choose_build(device, driver) == build


def test_an_unknown_device_is_refused_at_install():
    with pytest.raises(ValueError, match="auto, cuda, cpu"):
        choose_build("rocm", True)


def test_the_gpu_build_brings_its_cuda_libraries():
    assert requirement(GPU_BUILD, "1.31.1") == "onnxruntime-gpu[cuda,cudnn]==1.31.1"
    assert requirement(CPU_BUILD, "1.31.1") == "onnxruntime==1.31.1"
