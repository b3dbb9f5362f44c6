"""The runtime, bottom to top: env, packs, kernels; stats, cc, cache, tritonenv; timing,
arguments; tuning, reference; c_kernel, triton_kernel, bundle; loader; autotune, online;
dispatch; calls, gradients; binding."""
