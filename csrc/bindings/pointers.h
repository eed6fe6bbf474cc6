// What both binding modules (module_cpu.cpp, module_cuda.cpp) share: tensors arrive as addresses, Python
// ints (tensor.data_ptr()), 0 meaning "absent".
#pragma once

#include <cstdint>

namespace fastbert {
namespace bindings {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace bindings
}  // namespace fastbert
