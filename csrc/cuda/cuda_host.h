// Host-side helpers of the CUDA entry points (fused_cuda.cu, components_cuda.cu): CUDA
// errors as exceptions, a device guard and the checks that a pointer is device memory on
// the expected device. Included after the CUDA runtime (or its host emulation).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace anomfast {
namespace cuda_host {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("anomfast CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// Makes `dev` the current device for the scope (the tensors may live on a device other
// than the current one), restoring the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int dev) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != dev) check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// ------------------------------------------------------------------ argument checks
// Python validates tensors before they get here (views.h); these checks make a wrong call
// of the compiled entry points (a null or host pointer, a size that overflows, an unknown
// code) a clear exception instead of a crash or an illegal access on the device.

[[noreturn]] inline void bad_arg(const std::string& what) { throw std::invalid_argument("anomfast CUDA: " + what); }

// The device of a pointer into device (or managed) memory; throws for null, host or
// unregistered memory, and for a misaligned element pointer.
inline int device_of(int64_t ptr, const char* what, int64_t align) {
  if (ptr == 0) bad_arg(std::string(what) + " pointer is null");
  if (ptr % align != 0) bad_arg(std::string(what) + " pointer " + std::to_string(ptr) + " is not aligned to " +
                                std::to_string(align) + " bytes");
  cudaPointerAttributes attr{};
  check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)), "cudaPointerGetAttributes");
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::runtime_error(std::string("anomfast CUDA: the ") + what + " are not in device memory");
  return attr.device;
}

// A second buffer: in device memory, on the device of the first one (`first` names it).
inline void check_on(int dev, int64_t ptr, const char* what, int64_t align, const char* first = "logits") {
  const int d = device_of(ptr, what, align);
  if (d != dev)
    throw std::runtime_error(std::string("anomfast CUDA: the ") + what + " are on device " + std::to_string(d) +
                             ", the " + first + " on device " + std::to_string(dev));
}

}  // namespace cuda_host
}  // namespace anomfast
