"""
CUDA arrays for PyodeBridge: the state, the parameters and every callback buffer live on the GPU
and reach torch through DLPack without copies.

Streams: torch and CUDA.jl queue work on different streams, so every hand-off synchronises
explicitly — Julia calls `CUDA.synchronize()` before Python reads a Julia array, and the Python
side synchronises torch's current stream before Julia reads what it wrote. Producers stay alive:
`DLPack.share` keeps the Julia array referenced until torch releases the tensor, and
`from_python` copies torch's memory into a Julia-owned `CuArray` at once.

Untested in pyode-bridge's CI (no GPU with Julia there); see docs/julia.md.
"""
module PyodeBridgeCUDAExt

using CUDA: CUDA, CuArray, CuVector
using DLPack: DLPack
using PythonCall: PythonCall, Py
using PyodeBridge: PyodeBridge

const TORCH_FROM_DLPACK = PythonCall.pynew()

function __init__()
    PythonCall.pycopy!(TORCH_FROM_DLPACK, PythonCall.pyimport("torch").from_dlpack)
    return nothing
end

PyodeBridge.cuda_proto(::Type{T}) where {T} = CuVector{T}(undef, 0)

# Julia -> Python: a torch.Tensor viewing the same device memory (dimensions reversed for
# matrices, which the Python side undoes).
PyodeBridge.to_python(x::CuArray) = DLPack.share(x, TORCH_FROM_DLPACK)

# Python -> Julia: wrap torch's memory (DLPack) and copy it into a Julia-owned CuArray.
function PyodeBridge.from_python(proto::CuArray{T}, x) where {T}
    return CuArray{T}(DLPack.from_dlpack(Py(x)))
end

PyodeBridge.sync_device(::CuArray) = (CUDA.synchronize(); nothing)

end # module PyodeBridgeCUDAExt
