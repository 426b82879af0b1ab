"""asyncllm's own kernels. `cpu/`: C kernels built with gcc at first use and called through
ctypes. The Triton kernels for CUDA are the separate distribution `asyncllm-kernels`
(kernels/asyncllm_kernels), so triton stays an optional dependency."""
