"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp).

CONTRACT (other modules code against this; the implementation fills it in):

    settings = AllocatorSettings.from_snapshot(snapshot_dict_or_trace_settings)  # or AllocatorSettings()
    model = CachingAllocatorModel(settings, device=0)
    addr = model.malloc(size, stream=0, **fields)   # records 'segment_alloc' (if any) + 'alloc'
    model.free(addr, **fields)                     # records 'free_requested' + 'free_completed'
    model.empty_cache()                            # releases unsplit cached segments ('segment_free')
    model.segments() -> list[dict]                 # PyTorch snapshot 'segments' format, address order
    model.trace -> list[dict]                      # PyTorch 'device_traces' entry format
    model.snapshot() -> dict                       # {'segments', 'device_traces', 'allocator_settings'}
    model.reserved, model.allocated, model.requested   # current byte counts
    model.peak_reserved, model.peak_allocated

`fields` are copied into the recorded trace entries (frames, time_us, category,
user_metadata, compile_context). Addresses are synthetic (a fake cudaMalloc), unless a
segment address is forced (used when replaying a real trace).
"""
