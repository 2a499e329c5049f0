"""Fused CPU stencil kernel for one periodized DWT level along one axis (optional fast path).

Why: on CPU the windowed-GEMM path of :mod:`sgfm_dist.ops.wavelets` does ``block + 2 reach``
multiply-adds per output (2.75x the needed ones for db4) plus one window copy and one
band-major copy per axis, so one thread's DWT forward + inverse ran at 0.4-0.9x the cells/s
of an FFT pair. This kernel reads the input rows in place (periodic wrap by index) and writes
the band-major output directly: ``F`` multiply-adds per output and one pass over memory.

Layout: one axis of a contiguous tensor viewed as ``[L, n, M]``.

* forward: ``[L, n, M]`` -> band-major ``[2, L, n/2, M]`` with pywt's periodization
  ``lo[i] = sum_k dec_lo[k] u[(2i + F/2 - k) mod n]`` (``hi`` likewise);
* inverse: ``[2, L, n/2, M]`` -> ``[L, n, M]``, the adjoint written with ``rec = flip(dec)``:
  ``u[m] = sum_k rec_lo[F-1-k] lo[i] + rec_hi[F-1-k] hi[i]`` over ``2i + F/2 - k = m (mod n)``.

``M > 1``: for each row, each tap, a contiguous loop over a tile of ``M`` (auto-vectorized).
``M == 1`` (last axis): polyphase, the row split into wrapped even / odd streams so every tap
is a contiguous shifted loop. Built with ``torch.utils.cpp_extension.load_inline`` on first use
(torch's extension cache keeps it), ``-O3`` only (no ``-march=native``: the build may run on
a machine other than the one that uses the cache); x86-64 gets an AVX2+FMA clone picked at run
time by gcc's ``target_clones``. Any build or load failure logs one warning and returns None
(the GEMM path runs); ``SGFM_DWT_KERNEL=0`` disables the kernel. Summation order differs from
the GEMM's, so results agree to rounding, not bit for bit.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import threading

import torch

_log = logging.getLogger(__name__)

_CPP = r"""
#include <torch/extension.h>
#include <vector>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SGFM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SGFM_CLONES
#endif
#define SGFM_INLINE __attribute__((always_inline)) inline

static inline int64_t wrap(int64_t a, int64_t n) { a %= n; return a < 0 ? a + n : a; }

// The two inner loops, over t contiguous cells, with all taps summed in registers (K taps known
// at compile time when K > 0, so the tap loop unrolls and the cell loop vectorizes; K == 0:
// k taps at run time). Sources never alias the outputs (fresh tensors / scratch buffers).
// analysis: ol[m] = sum_k cl[k] src[k][m], oh[m] = sum_k ch[k] src[k][m]
template <typename T, int K>
SGFM_INLINE void analysis_dot(const T* const* src, const T* cl, const T* ch, T* __restrict__ ol,
                              T* __restrict__ oh, int64_t t, int64_t k_) {
  const int64_t k = K > 0 ? K : k_;
  T al[K > 0 ? K : 1], ah[K > 0 ? K : 1];
  const T* s[K > 0 ? K : 1];
  if (K > 0) {
    for (int64_t j = 0; j < k; ++j) { al[j] = cl[j]; ah[j] = ch[j]; s[j] = src[j]; }
#pragma GCC ivdep
    for (int64_t m = 0; m < t; ++m) {
      T a = 0, b = 0;
      for (int64_t j = 0; j < k; ++j) { a += al[j] * s[j][m]; b += ah[j] * s[j][m]; }
      ol[m] = a; oh[m] = b;
    }
  } else {
    for (int64_t m = 0; m < t; ++m) { ol[m] = 0; oh[m] = 0; }
    for (int64_t j = 0; j < k; ++j) {
      const T* __restrict__ sj = src[j];
      const T a = cl[j], b = ch[j];
      for (int64_t m = 0; m < t; ++m) { ol[m] += a * sj[m]; oh[m] += b * sj[m]; }
    }
  }
}

// synthesis: o[m] = sum_j (fl[j] pa[j][m] + fh[j] pb[j][m])
template <typename T, int K>
SGFM_INLINE void synthesis_dot(const T* const* pa, const T* const* pb, const T* fl, const T* fh,
                               T* __restrict__ o, int64_t t, int64_t k_) {
  const int64_t k = K > 0 ? K : k_;
  T cl[K > 0 ? K : 1], ch[K > 0 ? K : 1];
  const T* sa[K > 0 ? K : 1];
  const T* sb[K > 0 ? K : 1];
  if (K > 0) {
    for (int64_t j = 0; j < k; ++j) { cl[j] = fl[j]; ch[j] = fh[j]; sa[j] = pa[j]; sb[j] = pb[j]; }
#pragma GCC ivdep
    for (int64_t m = 0; m < t; ++m) {
      T a = 0;
      for (int64_t j = 0; j < k; ++j) a += cl[j] * sa[j][m] + ch[j] * sb[j][m];
      o[m] = a;
    }
  } else {
    for (int64_t m = 0; m < t; ++m) o[m] = 0;
    for (int64_t j = 0; j < k; ++j) {
      const T* __restrict__ a_ = pa[j];
      const T* __restrict__ b_ = pb[j];
      const T x = fl[j], y = fh[j];
      for (int64_t m = 0; m < t; ++m) o[m] += x * a_[m] + y * b_[m];
    }
  }
}

// forward: x [L, n, M] -> out [2, L, n/2, M]; lo/hi the dec filters.
// M == 1 (last axis): polyphase, the row split into wrapped even / odd streams.
template <typename T, int K>
SGFM_INLINE void fwd(const T* __restrict__ x, T* __restrict__ out, const T* lo, const T* hi,
                     int64_t L, int64_t n, int64_t M, int64_t F) {
  const int64_t nc = n / 2, h = F / 2;
  std::vector<const T*> src(F);
  std::vector<T> cl(F), ch(F);
  for (int64_t k = 0; k < F; ++k) { cl[k] = lo[k]; ch[k] = hi[k]; }
  if (M == 1) {
    const int64_t P = h;  // stream offsets floor((h - k) / 2) lie in [-P, P]
    std::vector<T> ev(nc + 2 * P), od(nc + 2 * P);
    for (int64_t l = 0; l < L; ++l) {
      const T* xl = x + l * n;
      T* __restrict__ e = ev.data() + P;
      T* __restrict__ d = od.data() + P;
      for (int64_t j = 0; j < nc; ++j) { e[j] = xl[2 * j]; d[j] = xl[2 * j + 1]; }
      for (int64_t j = 0; j < P; ++j) {  // periodic ends
        const int64_t q = wrap(j - P, nc), r = wrap(nc + j, nc);
        ev[j] = xl[2 * q]; od[j] = xl[2 * q + 1];
        e[nc + j] = xl[2 * r]; d[nc + j] = xl[2 * r + 1];
      }
      for (int64_t k = 0; k < F; ++k) {
        const int64_t s = h - k;                                 // input 2i + s
        const int64_t off = s >= 0 ? s / 2 : -((-s + 1) / 2);   // floor(s / 2)
        src[k] = ((s - 2 * off) ? od.data() : ev.data()) + P + off;
      }
      analysis_dot<T, K>(src.data(), cl.data(), ch.data(), out + l * nc, out + (L + l) * nc, nc, F);
    }
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    const T* xl = x + l * n * M;
    for (int64_t i = 0; i < nc; ++i) {
      for (int64_t k = 0; k < F; ++k) src[k] = xl + wrap(2 * i + h - k, n) * M;
      analysis_dot<T, K>(src.data(), cl.data(), ch.data(), out + (l * nc + i) * M,
                         out + ((L + l) * nc + i) * M, M, F);
    }
  }
}

// inverse: c [2, L, nc, M] -> out [L, 2 nc, M]; lo/hi the rec filters. Output r reads coarse
// i with 2i + h - k = r (mod n), i.e. taps k = h - r (mod 2), F/2 of them per band.
template <typename T, int K>
SGFM_INLINE void inv(const T* __restrict__ c, T* __restrict__ out, const T* lo, const T* hi,
                     int64_t L, int64_t nc, int64_t M, int64_t F) {
  const int64_t n = 2 * nc, h = F / 2, nt = F / 2;
  constexpr int KH = K / 2;
  std::vector<const T*> pa(nt), pb(nt);
  std::vector<T> fl[2], fh[2];
  for (int p = 0; p < 2; ++p) {
    for (int64_t k = ((h - p) % 2 + 2) % 2; k < F; k += 2) {
      fl[p].push_back(lo[F - 1 - k]); fh[p].push_back(hi[F - 1 - k]);
    }
  }
  if (M == 1) {
    const int64_t P = h;
    std::vector<T> a(nc + 2 * P), b(nc + 2 * P), ev(nc), od(nc);
    for (int64_t l = 0; l < L; ++l) {
      const T* cl_ = c + l * nc;
      const T* ch_ = c + (L + l) * nc;
      std::memcpy(a.data() + P, cl_, nc * sizeof(T));
      std::memcpy(b.data() + P, ch_, nc * sizeof(T));
      for (int64_t j = 0; j < P; ++j) {  // periodic ends
        const int64_t q = wrap(j - P, nc), r = wrap(nc + j, nc);
        a[j] = cl_[q]; b[j] = ch_[q];
        a[P + nc + j] = cl_[r]; b[P + nc + j] = ch_[r];
      }
      for (int p = 0; p < 2; ++p) {  // output 2j + p reads coarse j + (p + k - h) / 2
        int64_t t = 0;
        for (int64_t k = ((h - p) % 2 + 2) % 2; k < F; k += 2, ++t) {
          const int64_t off = (p + k - h) / 2;                  // exact: p + k - h is even
          pa[t] = a.data() + P + off; pb[t] = b.data() + P + off;
        }
        synthesis_dot<T, KH>(pa.data(), pb.data(), fl[p].data(), fh[p].data(), p ? od.data() : ev.data(), nc, nt);
      }
      T* o = out + l * n;
      for (int64_t j = 0; j < nc; ++j) { o[2 * j] = ev[j]; o[2 * j + 1] = od[j]; }
    }
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    const T* cl_ = c + l * nc * M;
    const T* ch_ = c + (L + l) * nc * M;
    for (int64_t r = 0; r < n; ++r) {
      const int p = static_cast<int>(r % 2);
      int64_t t = 0;
      for (int64_t k = ((h - r) % 2 + 2) % 2; k < F; k += 2, ++t) {
        const int64_t i = wrap(r + k - h, n) / 2;
        pa[t] = cl_ + i * M; pb[t] = ch_ + i * M;
      }
      synthesis_dot<T, KH>(pa.data(), pb.data(), fl[p].data(), fh[p].data(), out + (l * n + r) * M, M, nt);
    }
  }
}

#define SGFM_CASES(CALL)                                                                         \
  switch (F) {                                                                                 \
    case 2: CALL(2); break; case 4: CALL(4); break; case 6: CALL(6); break;                   \
    case 8: CALL(8); break; case 10: CALL(10); break; case 12: CALL(12); break;               \
    case 16: CALL(16); break; default: CALL(0); break;                                        \
  }

#define SGFM_DEFINE(T, NAME)                                                                   \
  SGFM_CLONES void fwd_##NAME(const T* x, T* o, const T* lo, const T* hi, int64_t L, int64_t n, \
                              int64_t M, int64_t F) {                                          \
    SGFM_CASES(SGFM_FWD_##NAME)                                                                \
  }                                                                                            \
  SGFM_CLONES void inv_##NAME(const T* c, T* o, const T* lo, const T* hi, int64_t L, int64_t nc, \
                              int64_t M, int64_t F) {                                          \
    SGFM_CASES(SGFM_INV_##NAME)                                                                \
  }
#define SGFM_FWD_f32(K) fwd<float, K>(x, o, lo, hi, L, n, M, F)
#define SGFM_INV_f32(K) inv<float, K>(c, o, lo, hi, L, nc, M, F)
#define SGFM_FWD_f64(K) fwd<double, K>(x, o, lo, hi, L, n, M, F)
#define SGFM_INV_f64(K) inv<double, K>(c, o, lo, hi, L, nc, M, F)

SGFM_DEFINE(float, f32)
SGFM_DEFINE(double, f64)

static void check(const torch::Tensor& x, const torch::Tensor& lo, const torch::Tensor& hi) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "sgfm dwt kernel: contiguous CPU tensor expected");
  TORCH_CHECK(lo.scalar_type() == x.scalar_type() && hi.scalar_type() == x.scalar_type() &&
              lo.is_contiguous() && hi.is_contiguous() && lo.numel() == hi.numel(),
              "sgfm dwt kernel: filters must match the data dtype");
}

// x [L, n, M] -> [2, L, n/2, M]
torch::Tensor dwt_axis(torch::Tensor x, torch::Tensor lo, torch::Tensor hi) {
  check(x, lo, hi);
  const int64_t L = x.size(0), n = x.size(1), M = x.size(2), F = lo.numel();
  TORCH_CHECK(n % 2 == 0, "sgfm dwt kernel: even extent expected");
  auto out = torch::empty({2, L, n / 2, M}, x.options());
  if (x.scalar_type() == torch::kFloat)
    fwd_f32(x.data_ptr<float>(), out.data_ptr<float>(), lo.data_ptr<float>(), hi.data_ptr<float>(), L, n, M, F);
  else if (x.scalar_type() == torch::kDouble)
    fwd_f64(x.data_ptr<double>(), out.data_ptr<double>(), lo.data_ptr<double>(), hi.data_ptr<double>(), L, n, M, F);
  else TORCH_CHECK(false, "sgfm dwt kernel: float32 or float64 expected");
  return out;
}

// c [2, L, nc, M] -> [L, 2 nc, M]
torch::Tensor idwt_axis(torch::Tensor c, torch::Tensor lo, torch::Tensor hi) {
  check(c, lo, hi);
  TORCH_CHECK(c.dim() == 4 && c.size(0) == 2, "sgfm dwt kernel: [2, L, nc, M] expected");
  const int64_t L = c.size(1), nc = c.size(2), M = c.size(3), F = lo.numel();
  auto out = torch::empty({L, 2 * nc, M}, c.options());
  if (c.scalar_type() == torch::kFloat)
    inv_f32(c.data_ptr<float>(), out.data_ptr<float>(), lo.data_ptr<float>(), hi.data_ptr<float>(), L, nc, M, F);
  else if (c.scalar_type() == torch::kDouble)
    inv_f64(c.data_ptr<double>(), out.data_ptr<double>(), lo.data_ptr<double>(), hi.data_ptr<double>(), L, nc, M, F);
  else TORCH_CHECK(false, "sgfm dwt kernel: float32 or float64 expected");
  return out;
}
"""

_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    """False when ``SGFM_DWT_KERNEL=0`` (read at every call, so tests can toggle it)."""
    return os.environ.get("SGFM_DWT_KERNEL", "1") != "0"


def load():
    """The built extension module (``dwt_axis``, ``idwt_axis``), or None when it cannot be
    built or loaded (one warning logged, then cached as unavailable for this process)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            module = None
            name = f"sgfm_dwt_kernel_v3_{platform.machine()}"
            try:
                from torch.utils.cpp_extension import _get_build_directory, load_inline

                build_dir = _get_build_directory(name, verbose=False)
                if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
                    # a pause of ~30 s with no output would look like a hang: say what it is
                    print(f"sgfm_dist: compiling the fused CPU DWT kernel (once per machine, ~30 s on one "
                          f"core; cached in {build_dir})", file=sys.stderr, flush=True)
                module = load_inline(
                    name=name,
                    cpp_sources=[_CPP],
                    functions=["dwt_axis", "idwt_axis"],
                    extra_cflags=["-O3", "-fno-fast-math"],
                    verbose=False)
            except Exception as e:  # noqa: BLE001 - any build/load failure means: use the GEMM path
                _log.warning("sgfm_dist: the fused CPU DWT kernel could not be built or loaded (%s: %s); "
                             "using the GEMM path", type(e).__name__, e)
                module = None
            _state["module"] = module
    return _state["module"]


def available() -> bool:
    """The kernel is enabled and built (builds it on first call)."""
    return enabled() and load() is not None
