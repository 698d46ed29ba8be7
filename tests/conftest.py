import os

import torch

# CI has 2 cores; intra-op threads fighting the test runner make small-tensor tests several times slower.
torch.set_num_threads(int(os.environ.get("BYTEDEPLOY_TEST_THREADS", "1")))
