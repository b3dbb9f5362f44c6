"""The runtime, bottom to top: stats, cc, cache, tritonenv; tuning, timing, arguments, reference;
c_kernel, triton_kernel, bundle, loader; dispatch; binding. autotune sits on top of them all."""
