import os

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_suite.sh)")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    import fastdiff

    info = fastdiff.build_info()
    return [
        f"fastdiff: cuda_compiled={info['cuda_compiled']} triton={info['triton']} "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} torch={info['torch']}",
        f"fastdiff backends: {info['backends']}",
    ]
