"""Bench tests run tiny models on a shared 2-core machine: one torch thread avoids OpenMP barrier stalls
there. Speed is never what these tests check; the thread count is restored after each test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
