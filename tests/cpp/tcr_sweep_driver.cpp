// Runs the Gauss-Jordan sweep of csrc/include/tcr_math.h the way csrc/cuda/tcr.cu does
// (phase 1 by 256 "threads", phase 2 by 8 "warps" of 32 "lanes", emulated one after another),
// in float32, on matrices read from stdin: "side" then side*side values, repeated.
// Prints the pivots (their logs sum to logdet M) and the swept matrix (-M^{-1}) for each.
#include <cmath>
#include <cstdio>
#include <vector>

#include "tcr_math.h"

int main() {
  const int kThreads = 256, kWarps = kThreads / 32;
  int side;
  while (std::scanf("%d", &side) == 1) {
    std::vector<float> a(side * side), col(side), pivots(side);
    for (float& v : a) std::scanf("%f", &v);
    for (int k = 0; k < side; ++k) {
      for (int t = 0; t < kThreads; ++t) empssl::tcr::sweep_copy_pivot_column(a.data(), side, side, k, col.data(), t, kThreads);
      pivots[k] = col[k];
      for (int warp = 0; warp < kWarps; ++warp)
        for (int lane = 0; lane < 32; ++lane)
          for (int i = warp; i < side; i += kWarps)
            empssl::tcr::sweep_update_row(a.data() + i * side, i, k, col.data(), side, lane, 32);
    }
    for (float p : pivots) std::printf("%.9g ", p);
    std::printf("\n");
    for (float v : a) std::printf("%.9g ", v);
    std::printf("\n");
  }
  return 0;
}
