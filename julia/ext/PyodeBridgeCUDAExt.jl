"""
CUDA arrays for PyodeBridge: the state, the parameters and every callback buffer live on the GPU
and reach torch without copies.

- Julia -> Python: a `CuArray` is lent as a torch tensor viewing its memory, made by
  `pyode_bridge.backends.julia._handoff.cuda_view` from the raw device pointer through
  `__cuda_array_interface__` (dimensions reversed, as for DLPack). The tensor holds no reference
  into Julia, so torch freeing it (from any thread) never runs Julia code; the `CuArray` is kept
  alive instead by the right-hand side's `shares` (per-solve storage that only PyodeBridge
  touches, emptied when the callback returns; never a finalizer or a global pool).
- Python -> Julia: Python passes a carrier holding the tensor and its device pointer; the memory
  is wrapped without ownership (`unsafe_wrap`) and copied at once into a Julia-owned `CuArray`.
- Device: every solve runs inside `CUDA.device!(index)` with torch's device index, so `cuda:1`
  tensors get Julia buffers on device 1.
- Streams: torch and CUDA.jl queue work on different streams, so every hand-off synchronises
  explicitly: Julia calls `CUDA.synchronize()` before Python reads a Julia array, and the Python
  side synchronises torch's current stream before Julia reads what it wrote.

Untested: no machine with both Julia and a GPU has run it (see docs/julia.md).
"""
module PyodeBridgeCUDAExt

using CUDA: CUDA, CuArray, CuVector, CuPtr
using PythonCall: PythonCall, Py, pyconvert
using PyodeBridge: PyodeBridge, PyRHS

const CUDA_VIEW = PythonCall.pynew()

function __init__()
    PythonCall.pycopy!(CUDA_VIEW,
        PythonCall.pyimport("pyode_bridge.backends.julia._handoff").cuda_view)
    return nothing
end

_typestr(::Type{Float32}) = "<f4"
_typestr(::Type{Float64}) = "<f8"

PyodeBridge.cuda_proto(::Type{T}, device::Integer) where {T} =
    CUDA.device!(() -> CuVector{T}(undef, 0), device)

PyodeBridge.with_device(f, ::CuArray, device::Integer) = CUDA.device!(f, device)

PyodeBridge.sync_device(::CuArray) = (CUDA.synchronize(); nothing)

function PyodeBridge.to_python(rhs::PyRHS, x::CuArray{T}) where {T}
    push!(rhs.shares, x)  # alive until the callback returns (call_python empties shares)
    return CUDA_VIEW(UInt(pointer(x)), reverse(size(x)), _typestr(T), rhs.device)
end

function _from_carrier(proto::CuArray{T}, x) where {T}
    typestr = pyconvert(String, x.typestr)
    typestr == _typestr(T) || throw(ArgumentError("expected a $(_typestr(T)) tensor, got $typestr"))
    n = pyconvert(Int, x.numel)
    dst = similar(proto, n)
    n == 0 && return dst
    # torch's memory, not owned; the Python carrier keeps the tensor alive during this call
    src = unsafe_wrap(CuArray, CuPtr{T}(pyconvert(UInt, x.ptr)), n)
    copyto!(dst, src)
    CUDA.synchronize()
    return dst
end

PyodeBridge.from_python(proto::CuArray{T}, x) where {T} = _from_carrier(proto, x)

PyodeBridge.from_python_matrix(proto::CuArray{T}, x, n::Integer, m::Integer) where {T} =
    reshape(_from_carrier(proto, x), n, m)

end # module PyodeBridgeCUDAExt
