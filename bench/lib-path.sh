# Sourced by the GPU scripts: the torch libraries (beside torch.__file__) and the CUDA
# runtime our kernels link (the pip toolkit's nvidia/cu13/lib, beside the torch folder).
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
CUDA_LIB="$(dirname "$(dirname "$TORCH_LIB")")/nvidia/cu13/lib"
export LD_LIBRARY_PATH="$TORCH_LIB:$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
