/* duoserve native: which SMs a kernel launch actually runs on.
 *
 * Under MPS a client's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE caps the SMs its kernels may use. The
 * probe launches many blocks that each record the SM they run on (PTX special register %smid)
 * and counts the distinct SMs, so a worker can report what its limit really gives it.
 *
 * C ABI (loaded with ctypes by services/common/sm_probe.py). Nothing here aborts or prints:
 * every failure (no driver, no device, a driver older than the runtime this library was built
 * with, a launch error) comes back as a nonzero code and a message in `err`.
 */
#ifndef DUOSERVE_SM_PROBE_H
#define DUOSERVE_SM_PROBE_H

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility; only these functions are exported. */
#define DUO_API __attribute__((visibility("default")))

/* Bumped when the ABI below changes; the Python loader refuses a library it does not know. */
#define DUO_SM_PROBE_VERSION 1

/* Error codes: 0 is success; the others name the cause (the message in `err` says more). */
#define DUO_SM_PROBE_OK 0
#define DUO_SM_PROBE_NO_DRIVER 1       /* libcuda.so.1 not found: no NVIDIA driver on this machine */
#define DUO_SM_PROBE_OLD_DRIVER 2      /* a driver older than the CUDA runtime linked in here */
#define DUO_SM_PROBE_NO_DEVICE 3       /* a driver, but no usable CUDA device */
#define DUO_SM_PROBE_BAD_ARGUMENT 4    /* device index out of range, or a negative count */
#define DUO_SM_PROBE_CUDA_ERROR 5      /* any other CUDA runtime error (allocation, launch, ...) */

/* DUO_SM_PROBE_VERSION of the built library. */
DUO_API int duo_sm_probe_version(void);

/* CUDART_VERSION the library was built with (e.g. 13000 for CUDA 13.0). */
DUO_API int duo_sm_probe_cuda_runtime_version(void);

/* CUDA driver API version of this machine's driver (e.g. 13000), or 0 when there is no driver. */
DUO_API int duo_sm_probe_driver_version(void);

/* Launch the probe kernel on `device` in this process's context (the primary context, the one
 * torch uses) and count the distinct SMs its blocks ran on.
 *   num_blocks  blocks to launch; <= 0 picks 4 x the device's SM count
 *   spin_us     how long each block stays resident (microseconds); < 0 picks 200
 *   out_num_sms_used   distinct SMs that ran at least one block
 *   out_num_sms_total  the multiprocessor count this context sees (cudaDevAttrMultiProcessorCount;
 *                      under an MPS active thread percentage that is already the limited count)
 *   err, err_len       a NUL-terminated message on failure (may be NULL)
 * Returns DUO_SM_PROBE_OK or one of the error codes above. Runs on its own non-blocking stream
 * and waits only for itself (its allocation and free may synchronize the device). */
DUO_API int duo_sm_probe(int device, int num_blocks, int spin_us, int *out_num_sms_used, int *out_num_sms_total,
                 char *err, int err_len);

#ifdef __cplusplus
}
#endif

#endif /* DUOSERVE_SM_PROBE_H */
