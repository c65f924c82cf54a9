// Connected components and per-component pixel counts of one image; see components_cpu.h
// for the buffers and anomfast/components.py for the metric definitions. Everything here
// is integer counting: the quotients (sIoU, PPV) are formed in Python in float64, as the
// benchmark forms them.
#include "components_cpu.h"

#include <algorithm>
#include <vector>

namespace anomfast {

namespace {

// Union-find over pixel indices, stored in the label array itself. A root always links
// under the smaller root, so parent[i] <= i and every root is its set's first pixel in
// raster order; that lets one raster pass turn parents into compact ids in place.
struct PixelForest {
  int32_t* parent;
  int32_t find(int32_t x) const {
    while (parent[x] != x) {
      parent[x] = parent[parent[x]];  // path halving
      x = parent[x];
    }
    return x;
  }
  int32_t unite(int32_t a, int32_t b) const {
    a = find(a);
    b = find(b);
    if (a > b) std::swap(a, b);
    parent[b] = a;
    return a;
  }
};

// 8-connected labeling in two raster passes. Of the four earlier neighbours, a foreground
// upper neighbour is already in one set with the other three (each touches it), and the
// left and upper-left ones are in one set (they touch), so at most one union per pixel
// (the decision tree of Wu, Otoo and Suzuki). fg(i): pixel i is foreground. Writes lab[i]
// = 0 for background, else 1..n in the raster order of each component's first pixel, and
// size[k] = pixels of component k (size[0] = 0). Returns n.
template <class Fg>
int32_t label8(const Fg& fg, int64_t H, int64_t W, int32_t* lab, std::vector<int64_t>& size) {
  const PixelForest f{lab};
  for (int64_t r = 0; r < H; ++r) {
    for (int64_t c = 0; c < W; ++c) {
      const int64_t i = r * W + c;
      if (!fg(i)) continue;
      if (r > 0 && fg(i - W)) {
        lab[i] = f.find((int32_t)(i - W));
        continue;
      }
      int64_t a = -1;
      if (c > 0 && fg(i - 1)) {
        a = i - 1;
      } else if (r > 0 && c > 0 && fg(i - W - 1)) {
        a = i - W - 1;
      }
      if (r > 0 && c + 1 < W && fg(i - W + 1)) {
        lab[i] = a >= 0 ? f.unite((int32_t)a, (int32_t)(i - W + 1)) : f.find((int32_t)(i - W + 1));
      } else {
        lab[i] = a >= 0 ? f.find((int32_t)a) : (int32_t)i;
      }
    }
  }
  // lab[p] of an earlier pixel p already holds its id when pixel i reads it
  int32_t n = 0;
  size.assign(1, 0);
  for (int64_t i = 0; i < H * W; ++i) {
    if (!fg(i)) {
      lab[i] = 0;
      continue;
    }
    const int32_t p = lab[i];
    if (p == (int32_t)i) {
      lab[i] = ++n;
      size.push_back(1);
    } else {
      lab[i] = lab[p];
      ++size[lab[i]];
    }
  }
  return n;
}

}  // namespace

int64_t components_cpu(int64_t pred_ptr, int64_t cls_ptr, int64_t H, int64_t W, int64_t thresh_segsize,
                       int64_t thresh_instsize, int64_t mode, int64_t work_ptr, int64_t gt_out_ptr,
                       int64_t pred_out_ptr, int64_t capacity, int64_t counts_ptr) {
  if (H < 1 || W < 1 || H * W >= (int64_t(1) << 31) || capacity < components_capacity(H, W) ||
      (mode != COMP_BENCHMARK && mode != COMP_CLEAN))
    return -1;
  const int64_t HW = H * W;
  const uint8_t* pred = reinterpret_cast<const uint8_t*>(pred_ptr);
  const int8_t* cls = reinterpret_cast<const int8_t*>(cls_ptr);
  int32_t* gl = reinterpret_cast<int32_t*>(work_ptr);
  int32_t* pl = gl + HW;
  int64_t* gt_out = reinterpret_cast<int64_t*>(gt_out_ptr);
  int64_t* pred_out = reinterpret_cast<int64_t*>(pred_out_ptr);
  int64_t* counts = reinterpret_cast<int64_t*>(counts_ptr);

  // ground-truth components; those under thresh_instsize become void
  std::vector<int64_t> gsize, psize;
  const int32_t ng = label8([cls](int64_t i) { return cls[i] == COMP_ANOMALY; }, H, W, gl, gsize);
  std::vector<uint8_t> gvoid(ng + 1, 0);
  int64_t n_anomaly = 0;
  for (int32_t g = 1; g <= ng; ++g) {
    gvoid[g] = gsize[g] < thresh_instsize;
    n_anomaly += gsize[g];
  }
  // benchmark quirk: its loop over component ids starts at id 0, the background, so an
  // image with fewer than thresh_instsize non-anomaly pixels (void included) loses them all
  gvoid[0] = mode == COMP_BENCHMARK && HW - n_anomaly < thresh_instsize;
  const auto roi = [&](int64_t i) { return cls[i] != COMP_VOID && !gvoid[gl[i]]; };

  // predicted segments. The benchmark labels them with only the original void cleared
  // (before small instances become void) and measures their size there; clean mode
  // labels them inside the final region of interest.
  int32_t np_;
  if (mode == COMP_BENCHMARK) {
    np_ = label8([pred, cls](int64_t i) { return pred[i] != 0 && cls[i] != COMP_VOID; }, H, W, pl, psize);
  } else {
    np_ = label8([&](int64_t i) { return pred[i] != 0 && roi(i); }, H, W, pl, psize);
  }
  std::vector<uint8_t> keep(np_ + 1, 0);
  for (int32_t s = 1; s <= np_; ++s) keep[s] = psize[s] >= thresh_segsize;

  // counts over the region of interest: per segment its pixels there, those on some
  // ground-truth component and those on none; per component the pixels some segment
  // covers; and the touching (component, segment) pairs
  std::vector<int64_t> roi_size(np_ + 1, 0), on_gt(np_ + 1, 0), off_gt(np_ + 1, 0), covered(ng + 1, 0);
  std::vector<int64_t> pairs;
  const int64_t stride = (int64_t)np_ + 1;
  int64_t last = -1;
  for (int64_t i = 0; i < HW; ++i) {
    if (!roi(i)) continue;
    const int32_t s = keep[pl[i]] ? pl[i] : 0;
    if (s == 0) continue;
    const int32_t g = gl[i];
    ++roi_size[s];
    if (g == 0) {
      ++off_gt[s];
      continue;
    }
    ++on_gt[s];
    ++covered[g];
    const int64_t key = (int64_t)g * stride + s;
    if (key != last) pairs.push_back(key);  // runs along a row repeat the pair
    last = key;
  }
  std::sort(pairs.begin(), pairs.end());
  pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());

  // adjusted unions: a component's own pixels plus the off-ground-truth pixels of every
  // segment touching it (the parts of those segments on other components are not
  // counted); a segment's own pixels plus the uncovered pixels of every component it touches
  std::vector<int64_t> gunion(gsize), punion(roi_size);
  for (const int64_t key : pairs) {
    const int64_t g = key / stride, s = key % stride;
    gunion[g] += off_gt[s];
    punion[s] += gsize[g] - covered[g];
  }
  int64_t k = 0;
  for (int32_t g = 1; g <= ng; ++g) {
    if (gvoid[g]) continue;
    gt_out[2 * k] = covered[g];
    gt_out[2 * k + 1] = gunion[g];
    ++k;
  }
  counts[0] = k;
  k = 0;
  for (int32_t s = 1; s <= np_; ++s) {
    if (!keep[s] || roi_size[s] == 0) continue;  // a segment lying only on new void is gone
    pred_out[3 * k] = on_gt[s];
    pred_out[3 * k + 1] = roi_size[s];
    pred_out[3 * k + 2] = punion[s];
    ++k;
  }
  counts[1] = k;
  return 0;
}

}  // namespace anomfast
