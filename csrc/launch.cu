// The launch mode of every kernel of this module (ops.h, common/launch.cuh).
#include "common/launch.cuh"
#include "ops.h"

namespace gf {
namespace {
bool programmatic = false;
}  // namespace

bool programmatic_launch() {
  if (!programmatic) return false;
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major >= 9;
}

void set_programmatic_launch(bool on) { programmatic = on; }

}  // namespace gf
