// Element types of the tensors the kernels read and write. ops.cpp maps torch's ScalarType to
// them (dtype_code); the kernels see no torch headers.
#pragma once

namespace empssl {

enum class DType : int { Float32, Float64, BFloat16, Float16 };

}  // namespace empssl
