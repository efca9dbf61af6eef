// duoserve native: the SM probe (see sm_probe.h for the C ABI).
//
// Each block's first thread reads the SM it runs on from the PTX special register %smid (PTX ISA,
// "Special Registers: %smid") and stores it at its block index; the block then stays resident for
// `spin_us` (measured with %globaltimer) so that the blocks of one wave sit on the GPU together and
// the hardware has to spread them over every SM the context may use. Blocks have 1024 threads, so
// at most two fit on an SM (2048 resident threads on sm_80/sm_90, 1536 on sm_86/sm_89): a wave
// covers every allowed SM rather than piling onto a few. The host counts the distinct ids.
//
// Only the CUDA runtime API is used, linked statically: the library then needs nothing but the
// driver (libcuda.so.1), which the runtime loads at the first call, so on a machine without one
// the library still loads and every call returns DUO_SM_PROBE_NO_DRIVER.
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "sm_probe.h"

namespace {

constexpr int kThreadsPerBlock = 1024;     // the most a block may have: caps blocks per SM at 1-2
constexpr int kDefaultBlocksPerSm = 4;     // blocks per SM when the caller passes num_blocks <= 0
constexpr int kDefaultSpinUs = 200;        // residency per block when the caller passes spin_us < 0
constexpr unsigned kNotRun = 0xffffffffu;  // the marker a block overwrites with its SM id

__device__ __forceinline__ unsigned sm_id() {
    unsigned id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// block_sm: [gridDim.x], one SM id per block.
__global__ void probe_kernel(unsigned *block_sm, unsigned long long spin_ns) {
    if (threadIdx.x == 0) {
        unsigned long long start = global_ns();
        block_sm[blockIdx.x] = sm_id();
        while (global_ns() - start < spin_ns) {
        }
    }
    __syncthreads();   // the whole block stays resident while thread 0 spins
}

int fail(char *err, int err_len, int code, const char *fmt, ...) {
    if (err != nullptr && err_len > 0) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(err, static_cast<size_t>(err_len), fmt, args);
        va_end(args);
    }
    return code;
}

int cuda_fail(char *err, int err_len, const char *what, cudaError_t e) {
    return fail(err, err_len, DUO_SM_PROBE_CUDA_ERROR, "%s: %s (%s)", what, cudaGetErrorString(e),
                cudaGetErrorName(e));
}

// Why the runtime cannot start here, as one of our codes and a message a person can act on.
int init_fail(char *err, int err_len, cudaError_t e) {
    int driver = 0;
    cudaDriverGetVersion(&driver);   // 0: no driver could be loaded
    if (driver == 0) {
        return fail(err, err_len, DUO_SM_PROBE_NO_DRIVER,
                    "no CUDA driver: libcuda.so.1 could not be loaded (no NVIDIA driver on this machine)");
    }
    if (e == cudaErrorInsufficientDriver) {
        return fail(err, err_len, DUO_SM_PROBE_OLD_DRIVER,
                    "CUDA driver %d.%d is older than the CUDA runtime %d.%d this library was built with",
                    driver / 1000, driver % 1000 / 10, CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
    }
    if (e == cudaErrorNoDevice) {
        return fail(err, err_len, DUO_SM_PROBE_NO_DEVICE, "no CUDA device: %s", cudaGetErrorString(e));
    }
    return cuda_fail(err, err_len, "cudaGetDeviceCount", e);
}

// Owns the probe's stream and buffer so every exit path frees them.
struct ProbeResources {
    cudaStream_t stream = nullptr;
    unsigned *block_sm = nullptr;

    ~ProbeResources() {
        if (block_sm != nullptr) cudaFree(block_sm);
        if (stream != nullptr) cudaStreamDestroy(stream);
    }
};

int run_probe(int device, int num_blocks, int spin_us, int *used, int *total, char *err, int err_len) {
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaSetDevice", e);
    e = cudaDeviceGetAttribute(total, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return cuda_fail(err, err_len, "cudaDeviceGetAttribute(MultiProcessorCount)", e);
    int blocks = num_blocks > 0 ? num_blocks : kDefaultBlocksPerSm * *total;
    unsigned long long spin_ns = 1000ull * static_cast<unsigned long long>(spin_us >= 0 ? spin_us : kDefaultSpinUs);

    ProbeResources r;
    // Non-blocking: the legacy default stream would wait for (and hold up) torch's work.
    if ((e = cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking)) != cudaSuccess)
        return cuda_fail(err, err_len, "cudaStreamCreateWithFlags", e);
    size_t bytes = sizeof(unsigned) * static_cast<size_t>(blocks);
    if ((e = cudaMalloc(&r.block_sm, bytes)) != cudaSuccess) return cuda_fail(err, err_len, "cudaMalloc", e);
    if ((e = cudaMemsetAsync(r.block_sm, 0xff, bytes, r.stream)) != cudaSuccess)
        return cuda_fail(err, err_len, "cudaMemsetAsync", e);
    probe_kernel<<<blocks, kThreadsPerBlock, 0, r.stream>>>(r.block_sm, spin_ns);
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_fail(err, err_len, "probe kernel launch", e);
    std::vector<unsigned> block_sm(static_cast<size_t>(blocks));
    if ((e = cudaMemcpyAsync(block_sm.data(), r.block_sm, bytes, cudaMemcpyDeviceToHost, r.stream)) != cudaSuccess)
        return cuda_fail(err, err_len, "cudaMemcpyAsync", e);
    if ((e = cudaStreamSynchronize(r.stream)) != cudaSuccess) return cuda_fail(err, err_len, "probe kernel", e);

    std::vector<bool> seen;
    int distinct = 0;
    for (unsigned id : block_sm) {
        if (id == kNotRun) return fail(err, err_len, DUO_SM_PROBE_CUDA_ERROR, "a probe block never ran");
        if (id >= seen.size()) seen.resize(id + 1, false);
        if (!seen[id]) {
            seen[id] = true;
            ++distinct;
        }
    }
    *used = distinct;
    return DUO_SM_PROBE_OK;
}

}  // namespace

extern "C" {

DUO_API int duo_sm_probe_version(void) { return DUO_SM_PROBE_VERSION; }

DUO_API int duo_sm_probe_cuda_runtime_version(void) { return CUDART_VERSION; }

DUO_API int duo_sm_probe_driver_version(void) {
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess) return 0;
    return driver;
}

DUO_API int duo_sm_probe(int device, int num_blocks, int spin_us, int *out_num_sms_used, int *out_num_sms_total,
                 char *err, int err_len) {
    if (err != nullptr && err_len > 0) err[0] = '\0';
    if (out_num_sms_used == nullptr || out_num_sms_total == nullptr)
        return fail(err, err_len, DUO_SM_PROBE_BAD_ARGUMENT, "out_num_sms_used and out_num_sms_total must not be NULL");
    *out_num_sms_used = 0;
    *out_num_sms_total = 0;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) return init_fail(err, err_len, e);
    if (count == 0) return fail(err, err_len, DUO_SM_PROBE_NO_DEVICE, "no CUDA device");
    if (device < 0 || device >= count)
        return fail(err, err_len, DUO_SM_PROBE_BAD_ARGUMENT, "device %d: this machine has CUDA devices 0..%d",
                    device, count - 1);
    if (num_blocks > (1 << 20))
        return fail(err, err_len, DUO_SM_PROBE_BAD_ARGUMENT, "num_blocks %d: at most %d", num_blocks, 1 << 20);
    if (spin_us > 1000000)
        return fail(err, err_len, DUO_SM_PROBE_BAD_ARGUMENT, "spin_us %d: at most 1000000", spin_us);

    int previous = -1;
    cudaGetDevice(&previous);   // leave the calling thread on the device it was on (torch's)
    int code = run_probe(device, num_blocks, spin_us, out_num_sms_used, out_num_sms_total, err, err_len);
    if (previous >= 0 && previous != device) cudaSetDevice(previous);
    return code;
}

}  // extern "C"
