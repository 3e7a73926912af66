/*
 * p2ptrain Redis module: gradients averaged and the model updated inside Redis at memory speed.
 *
 *   P2P.ACCUM acc meta part weight blob [EX seconds]   -> 1 added, 0 if `part` was already added
 *       acc += weight * blob (raw little-endian float32), once per part id; meta (a hash) records
 *       each part's weight plus the running totals `~weight` and `~parts`. With EX, both keys get
 *       that TTL (also when the part was already added): one command where a pipeline took three.
 *   P2P.MEAN acc meta                     -> [acc / ~weight as float32 bytes, ~weight, ~parts] or nil
 *   P2P.MEANSTORE acc meta dst [EX seconds] -> the same reply, and the mean also written to `dst` as a
 *       p2ptrain wire tensor (16-byte header + float32; replacing any string there), with that TTL:
 *       a peer parks its round's average in its outbox without sending it back. Nothing is written
 *       when nothing was accumulated (nil).
 *   P2P.SGD src dst buf grad lr momentum dampening weight_decay nesterov [EX seconds] [REUSE old]
 *       -> 1 stepped, 0 if `dst` already exists (the step for that version was taken)
 *       one torch.optim.SGD step: model `src` (a p2ptrain wire tensor: 16-byte header + float32)
 *       becomes model `dst` (same format; dst == src updates in place), momentum buffer `buf`
 *       (raw float32, created on the first step) updated in place. REUSE: `old`, a version no one
 *       reads any more, is removed; when it is a model of the same shape, the step writes into it and
 *       renames it `dst` instead of allocating (and zero-filling) a new value and freeing `old`.
 *   P2P.ADAM src dst state grad lr beta1 beta2 eps weight_decay decoupled [EX seconds] [REUSE old]
 *       -> the same for torch.optim.Adam (decoupled=1: AdamW); `state` holds the step count and
 *       both moment estimates (16-byte header "P2PA", u32 0, f64 step; then exp_avg, exp_avg_sq).
 *
 *   P2P.STATS [RESET]                     -> [longest stretch in ms of CPU the module held Redis, count]
 *
 * Every argument is validated before anything is written, so a bad call leaves the keys untouched.
 * Operations on more than ASYNC_MIN_FLOATS floats run in slices of at most SLICE_MS from a timer
 * on the main thread while the caller is blocked, so Redis keeps answering other clients (PING)
 * during a 10^7-element step. Module commands on a key that an operation in flight uses queue
 * behind it (first in, first out), so they never see a half-done operation; plain Redis commands
 * (GET) on such a key can, which is why a model step should write a new version key. Inside MULTI
 * or a script a client cannot block: there an operation runs whole, or gets BUSY if its keys are in
 * use by a queued one. A sliced write whose client disconnects before the end is applied but not
 * replicated (the reply callback, which replicates, is not called for a gone client).
 * Writes are replicated verbatim (every command is deterministic).
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "redismodule_min.h"

/* Redis strings carry no alignment guarantee: access floats through unaligned types. */
typedef float __attribute__((aligned(1), may_alias)) ufloat;
typedef uint32_t __attribute__((aligned(1), may_alias)) ubits;

#define ASYNC_MIN_FLOATS ((size_t)1 << 21) /* 8 MB: below this a command takes a few ms at most */
#define CHUNK_FLOATS ((size_t)1 << 18)     /* 1 MB of each operand between clock checks */
#define SLICE_MS 5.0                       /* longest stretch a sliced operation holds Redis */
#define WIRE_HEADER 16                     /* p2ptrain.wire: magic, version, dtype, compression, pad, numel */
#define ADAM_HEADER 16

/* ------------------------------------------------------------------------------------------------
 * Kernels: one pass over memory each, simple loops the compiler vectorises.
 *
 * With P2PTRAIN_CLONES (p2ptrain.native defines it where the compiler and libc support ifuncs) each
 * kernel is compiled twice on x86-64, for AVX2 and for the baseline ISA, and the loader picks one
 * for the CPU it runs on: 256-bit loops without building for one machine (-march=native would break
 * an image moved to an older CPU). The elementwise loops round identically either way (ISO C mode
 * keeps a*b+c unfused), so results do not depend on the CPU. 8 ACCUMs and a MEAN of 1M floats took
 * 17% less server time with the clones on this machine (6.7 vs 8.1 ms, one run alternated). */

#if defined(P2PTRAIN_CLONES) && defined(__x86_64__)
#define KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define KERNEL
#endif

KERNEL static int all_finite(const ufloat *values, size_t n) {
    /* Exponent bits all ones is Inf or NaN: an integer test vectorises where isfinite() may not. */
    const ubits *bits = (const ubits *)values;
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (bits[i] & 0x7f800000u) == 0x7f800000u;
    return !bad;
}

KERNEL static void axpy(ufloat *restrict sum, const ufloat *restrict x, float w, size_t n) {
    for (size_t i = 0; i < n; i++) sum[i] += w * x[i];
}

KERNEL static void scaled(ufloat *restrict out, const ufloat *restrict x, float w, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = w * x[i];
}

typedef struct {
    float lr, momentum, dampening, weight_decay;
    int nesterov, first;
} SgdParams;

/* torch.optim.SGD (single-tensor path), element by element; `out` may alias `in` (in place). */
KERNEL static void sgd_kernel(ufloat *out, const ufloat *in, ufloat *restrict buf, const ufloat *restrict g, size_t n,
                       SgdParams h) {
    const float keep = 1.0f - h.dampening;
    if (h.momentum == 0.0f) {
        for (size_t i = 0; i < n; i++) out[i] = in[i] + -h.lr * (g[i] + h.weight_decay * in[i]);
    } else if (h.first) {
        for (size_t i = 0; i < n; i++) {
            float d = g[i] + h.weight_decay * in[i];
            buf[i] = d;
            out[i] = in[i] + -h.lr * (h.nesterov ? d + h.momentum * d : d);
        }
    } else if (h.nesterov) {
        for (size_t i = 0; i < n; i++) {
            float d = g[i] + h.weight_decay * in[i];
            float b = buf[i] * h.momentum + keep * d;
            buf[i] = b;
            out[i] = in[i] + -h.lr * (d + h.momentum * b);
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            float d = g[i] + h.weight_decay * in[i];
            float b = buf[i] * h.momentum + keep * d;
            buf[i] = b;
            out[i] = in[i] + -h.lr * b;
        }
    }
}

typedef struct {
    float lr, beta1, beta2, eps, weight_decay, step_size, bias2_sqrt;
    int decoupled;
} AdamParams;

/* torch.optim.Adam / AdamW (single-tensor path, amsgrad off). */
KERNEL static void adam_kernel(ufloat *out, const ufloat *in, ufloat *restrict m, ufloat *restrict v,
                        const ufloat *restrict g, size_t n, AdamParams h) {
    const float decay = h.decoupled ? 1.0f - h.lr * h.weight_decay : 1.0f;
    const float coupled = h.decoupled ? 0.0f : h.weight_decay;
    const float one_minus_beta1 = 1.0f - h.beta1, one_minus_beta2 = 1.0f - h.beta2;
    for (size_t i = 0; i < n; i++) {
        float p = in[i] * decay;
        float d = g[i] + coupled * in[i];
        float mi = m[i] + one_minus_beta1 * (d - m[i]);
        float vi = v[i] * h.beta2 + one_minus_beta2 * d * d;
        m[i] = mi;
        v[i] = vi;
        out[i] = p + -h.step_size * (mi / (sqrtf(vi) / h.bias2_sqrt + h.eps));
    }
}

/* ------------------------------------------------------------------------------------------------
 * Operations: validated into a Job, then start -> slices -> finish, in one call or across timer ticks. */

typedef enum { OP_ACCUM, OP_MEAN, OP_SGD, OP_ADAM } OpKind;
static const char *const OP_NAMES[] = {"P2P.ACCUM", "P2P.MEAN", "P2P.SGD", "P2P.ADAM"};
#define MEAN_DST 2 /* P2P.MEANSTORE: the key index the mean is written to (key_count 3) */

typedef enum { STEP_MORE, STEP_DONE } StepState;

typedef struct Job {
    OpKind kind;
    int db;
    int async; /* strings retained, client blocked */
    RedisModuleBlockedClient *client;
    RedisModuleString *keys[4]; /* SGD/ADAM: src, dst, state, and REUSE's old version (key_count 4) */
    int key_count;
    RedisModuleString *part, *weight_text, *grad; /* ACCUM: part, weight; ACCUM/SGD/ADAM: grad */
    size_t n, checked, done; /* elements of the gradient checked finite, elements computed */
    int started;
    size_t allocate[3]; /* bytes of a key still to be created, by key index (0: none) */
    int header_key;     /* the key index created with `header` in front (0: none) */
    int reusing;        /* SGD/ADAM with REUSE: the step writes into keys[3], renamed dst at the end */
    char header[WIRE_HEADER];
    double weight;
    SgdParams sgd;
    AdamParams adam;
    double adam_step;
    long long ttl_ms;
    /* outcome */
    int failed;
    char error[256];
    long long result; /* 1 / 0, or -1 for a nil reply (MEAN of nothing) */
    float *mean;
    char total_text[64];
    size_t total_len;
    long long parts;
    struct Job *next;
} Job;

static Job *queue_head, *queue_tail;
static int timer_armed;

static StepState fail(Job *job, const char *format, const char *detail) {
    job->failed = 1;
    snprintf(job->error, sizeof job->error, format, detail);
    return STEP_DONE;
}

static const char *key_name(Job *job, int index) {
    size_t len;
    return RedisModule_StringPtrLen(job->keys[index], &len);
}

/* Opening a missing key read-only gives NULL, a valid "empty" key: wrong types get their own marker. */
static char wrong_type_marker;
#define WRONG_TYPE ((RedisModuleKey *)&wrong_type_marker)

static RedisModuleKey *open_string(RedisModuleCtx *ctx, RedisModuleString *name, int mode, size_t *len) {
    RedisModuleKey *key = RedisModule_OpenKey(ctx, name, mode);
    int type = RedisModule_KeyType(key);
    if (type == REDISMODULE_KEYTYPE_EMPTY) {
        *len = 0;
        return key;
    }
    if (type != REDISMODULE_KEYTYPE_STRING) {
        RedisModule_CloseKey(key);
        return WRONG_TYPE;
    }
    *len = RedisModule_ValueLength(key);
    return key;
}

/* A key's float32 payload of exactly `bytes`, re-fetched for every slice: between slices other
 * commands run, and the value may have moved or been replaced. */
static ufloat *payload(RedisModuleCtx *ctx, RedisModuleString *name, size_t bytes, size_t offset, int mode) {
    size_t len;
    RedisModuleKey *key = open_string(ctx, name, REDISMODULE_READ | mode, &len);
    if (key == WRONG_TYPE || len != bytes) return NULL;
    char *data = RedisModule_StringDMA(key, &len, mode ? REDISMODULE_WRITE : REDISMODULE_READ);
    RedisModule_CloseKey(key); /* the pointer stays valid until the key is modified by someone else */
    return data == NULL ? NULL : (ufloat *)(data + offset);
}

static int valid_model_header(const char *data, size_t len, size_t n) {
    if (len != WIRE_HEADER + n * sizeof(float) || memcmp(data, "P2PT", 4) != 0) return 0;
    uint64_t numel;
    memcpy(&numel, data + 8, sizeof numel);
    return data[4] == 1 && data[5] == 1 && data[6] == 0 && numel == n; /* version 1, float32, uncompressed */
}

static void expire(RedisModuleCtx *ctx, RedisModuleString *name, long long ttl_ms) {
    RedisModuleKey *key = RedisModule_OpenKey(ctx, name, REDISMODULE_READ | REDISMODULE_WRITE);
    if (RedisModule_KeyType(key) != REDISMODULE_KEYTYPE_EMPTY) RedisModule_SetExpire(key, ttl_ms);
    RedisModule_CloseKey(key);
}

/* ACCUM's `EX`: both keys get the TTL, whether the part was added now or before. */
static void expire_accum(RedisModuleCtx *ctx, const Job *job) {
    if (job->ttl_ms <= 0) return;
    expire(ctx, job->keys[0], job->ttl_ms);
    expire(ctx, job->keys[1], job->ttl_ms);
}

static StepState start_accum(RedisModuleCtx *ctx, Job *job) {
    size_t acc_len;
    RedisModuleKey *acc = open_string(ctx, job->keys[0], REDISMODULE_READ | REDISMODULE_WRITE, &acc_len);
    RedisModuleKey *meta = RedisModule_OpenKey(ctx, job->keys[1], REDISMODULE_READ);
    int meta_type = RedisModule_KeyType(meta);
    RedisModule_CloseKey(meta);
    if (acc == WRONG_TYPE || (meta_type != REDISMODULE_KEYTYPE_EMPTY && meta_type != REDISMODULE_KEYTYPE_HASH))
        return fail(job, "%s", REDISMODULE_ERRORMSG_WRONGTYPE);
    if (acc_len != 0 && acc_len != job->n * sizeof(float)) {
        RedisModule_CloseKey(acc);
        char counts[96];
        snprintf(counts, sizeof counts, "%zu floats, got %zu", acc_len / sizeof(float), job->n);
        return fail(job, "ERR shape mismatch: accumulator has %s", counts);
    }
    /* Idempotence: a part already recorded in meta was added; a retried micro-batch changes nothing. */
    RedisModuleCallReply *seen = RedisModule_Call(ctx, "HEXISTS", "ss", job->keys[1], job->part);
    if (RedisModule_CallReplyType(seen) != REDISMODULE_REPLY_INTEGER) {
        RedisModule_CloseKey(acc);
        return fail(job, "ERR cannot read the meta hash %s", key_name(job, 1));
    }
    if (RedisModule_CallReplyInteger(seen) == 1) {
        RedisModule_CloseKey(acc);
        expire_accum(ctx, job);
        job->result = 0;
        return STEP_DONE;
    }
    if (acc_len == 0) job->allocate[0] = job->n * sizeof(float);
    RedisModule_CloseKey(acc);
    return STEP_MORE;
}

/* The buffer a MEAN run in one piece scales into, kept between calls: a fresh multi-megabyte
 * allocation costs a page fault per 4 KB on every call. Sliced MEANs (bigger) get their own. */
static float *scratch;
static size_t scratch_bytes;

static float *scratch_floats(size_t bytes) {
    if (bytes > scratch_bytes) {
        RedisModule_Free(scratch);
        scratch = RedisModule_Alloc(bytes);
        scratch_bytes = bytes;
    }
    return scratch;
}

static StepState start_mean(RedisModuleCtx *ctx, Job *job) {
    size_t acc_len;
    RedisModuleKey *acc = open_string(ctx, job->keys[0], REDISMODULE_READ, &acc_len);
    if (acc == WRONG_TYPE) return fail(job, "%s", REDISMODULE_ERRORMSG_WRONGTYPE);
    RedisModule_CloseKey(acc);
    if (acc_len == 0) {
        job->result = -1;
        return STEP_DONE;
    }
    if (acc_len % sizeof(float) != 0) return fail(job, "ERR accumulator %s is not float32", key_name(job, 0));
    RedisModuleCallReply *totals = RedisModule_Call(ctx, "HMGET", "scc", job->keys[1], "~weight", "~parts");
    if (RedisModule_CallReplyType(totals) != REDISMODULE_REPLY_ARRAY || RedisModule_CallReplyLength(totals) != 2)
        return fail(job, "ERR cannot read the accumulator's meta hash %s", key_name(job, 1));
    size_t weight_len, parts_len;
    const char *weight_text = RedisModule_CallReplyStringPtr(RedisModule_CallReplyArrayElement(totals, 0), &weight_len);
    const char *parts_text = RedisModule_CallReplyStringPtr(RedisModule_CallReplyArrayElement(totals, 1), &parts_len);
    if (weight_text == NULL || parts_text == NULL || weight_len == 0 || weight_len >= sizeof job->total_text ||
        parts_len > 20)
        return fail(job, "ERR accumulator %s has no recorded weight", key_name(job, 0));
    memcpy(job->total_text, weight_text, weight_len);
    job->total_text[weight_len] = '\0';
    job->total_len = weight_len;
    job->weight = strtod(job->total_text, NULL);
    char buffer[24];
    memcpy(buffer, parts_text, parts_len);
    buffer[parts_len] = '\0';
    job->parts = strtoll(buffer, NULL, 10);
    if (!(job->weight > 0)) return fail(job, "ERR accumulator %s has no recorded weight", key_name(job, 0));
    job->n = acc_len / sizeof(float);
    if (job->key_count == 3) { /* MEANSTORE: dst is replaced by a new wire tensor of the mean */
        size_t dst_len;
        RedisModuleKey *dst = open_string(ctx, job->keys[MEAN_DST], REDISMODULE_READ | REDISMODULE_WRITE, &dst_len);
        if (dst == WRONG_TYPE) return fail(job, "WRONGTYPE %s is not a string", key_name(job, MEAN_DST));
        if (dst_len != 0) RedisModule_DeleteKey(dst);
        RedisModule_CloseKey(dst);
        uint64_t numel = job->n;
        memcpy(job->header, "P2PT\1\1\0\0", 8); /* version 1, float32, uncompressed, pad */
        memcpy(job->header + 8, &numel, sizeof numel);
        job->header_key = MEAN_DST;
        job->allocate[MEAN_DST] = WIRE_HEADER + acc_len;
        /* Run in one piece it replies from dst itself; sliced, other commands may change dst before the
         * reply, so the mean is kept apart too. */
        job->mean = job->async ? RedisModule_Alloc(acc_len) : NULL;
        return STEP_MORE;
    }
    job->mean = job->async ? RedisModule_Alloc(acc_len) : scratch_floats(acc_len);
    return STEP_MORE;
}

/* REUSE's old version can take the step's output: a string of the source's length and header. */
static int reusable(RedisModuleCtx *ctx, Job *job, const char *header, size_t bytes) {
    size_t len;
    RedisModuleKey *old = open_string(ctx, job->keys[3], REDISMODULE_READ, &len);
    if (old == WRONG_TYPE) return 0;
    int same = len == bytes && memcmp(RedisModule_StringDMA(old, &len, REDISMODULE_READ), header, WIRE_HEADER) == 0;
    RedisModule_CloseKey(old);
    return same;
}

/* SGD and Adam share their model handling: `src` must be a float32 wire tensor of n elements, a
 * distinct `dst` must not exist yet (it is created with src's header), and the state key (momentum
 * buffer or Adam moments) must be absent (first step) or exactly `state_bytes` long. */
static StepState start_model_step(RedisModuleCtx *ctx, Job *job, size_t state_bytes, int *first) {
    size_t src_len, state_len;
    RedisModuleKey *src = open_string(ctx, job->keys[0], REDISMODULE_READ, &src_len);
    if (src == WRONG_TYPE) return fail(job, "WRONGTYPE model %s is not a string", key_name(job, 0));
    if (src_len == 0) {
        RedisModule_CloseKey(src);
        return fail(job, "ERR model %s does not exist", key_name(job, 0));
    }
    const char *model = RedisModule_StringDMA(src, &src_len, REDISMODULE_READ);
    if (!valid_model_header(model, src_len, job->n)) {
        RedisModule_CloseKey(src);
        char expected[128];
        snprintf(expected, sizeof expected, "%s is not an uncompressed float32 p2ptrain tensor of %zu elements",
                 key_name(job, 0), job->n);
        return fail(job, "ERR model %s (the gradient's length)", expected);
    }
    char header[WIRE_HEADER];
    memcpy(header, model, WIRE_HEADER);
    RedisModule_CloseKey(src);

    int in_place = RedisModule_StringCompare(job->keys[0], job->keys[1]) == 0;
    if (state_bytes > 0) {
        RedisModuleKey *state = open_string(ctx, job->keys[2], REDISMODULE_READ, &state_len);
        if (state == WRONG_TYPE) return fail(job, "WRONGTYPE optimizer state %s is not a string", key_name(job, 2));
        RedisModule_CloseKey(state);
        if (state_len != 0 && state_len != state_bytes) {
            char detail[160];
            snprintf(detail, sizeof detail, "%s has %zu bytes, expected %zu for %zu parameters", key_name(job, 2),
                     state_len, state_bytes, job->n);
            return fail(job, "ERR optimizer state %s", detail);
        }
        *first = state_len == 0;
    }
    if (!in_place) {
        size_t dst_len;
        RedisModuleKey *dst = open_string(ctx, job->keys[1], REDISMODULE_READ | REDISMODULE_WRITE, &dst_len);
        if (dst == WRONG_TYPE) return fail(job, "WRONGTYPE model %s is not a string", key_name(job, 1));
        if (dst_len != 0) { /* this version was already stepped to: a retry changes nothing */
            RedisModule_CloseKey(dst);
            job->result = 0;
            return STEP_DONE;
        }
        RedisModule_CloseKey(dst);
        job->reusing = job->key_count == 4 && reusable(ctx, job, header, src_len);
        if (!job->reusing) {
            job->allocate[1] = src_len;
            job->header_key = 1;
            memcpy(job->header, header, WIRE_HEADER);
        }
    }
    if (state_bytes > 0 && *first) job->allocate[2] = state_bytes;
    return STEP_MORE;
}

static StepState start_adam(RedisModuleCtx *ctx, Job *job) {
    int first = 0;
    size_t bytes = ADAM_HEADER + 2 * job->n * sizeof(float), len;
    double step = 0;
    RedisModuleKey *key = open_string(ctx, job->keys[2], REDISMODULE_READ, &len);
    if (key != WRONG_TYPE && len == bytes) { /* other lengths and types are refused by start_model_step */
        const char *data = RedisModule_StringDMA(key, &len, REDISMODULE_READ);
        memcpy(&step, data + 8, sizeof step);
        if (memcmp(data, "P2PA", 4) != 0 || !(step >= 1) || step != floor(step)) {
            RedisModule_CloseKey(key);
            return fail(job, "ERR optimizer state %s is not a P2P.ADAM state", key_name(job, 2));
        }
    }
    if (key != WRONG_TYPE) RedisModule_CloseKey(key);
    StepState state = start_model_step(ctx, job, bytes, &first);
    if (state == STEP_DONE) return state;
    job->adam_step = first ? 1 : step + 1;
    AdamParams *h = &job->adam;
    h->step_size = (float)(h->lr / (1.0 - pow(h->beta1, job->adam_step)));
    h->bias2_sqrt = (float)sqrt(1.0 - pow(h->beta2, job->adam_step));
    return STEP_MORE;
}

static StepState start(RedisModuleCtx *ctx, Job *job) {
    job->started = 1;
    switch (job->kind) {
    case OP_ACCUM: return start_accum(ctx, job);
    case OP_MEAN: return start_mean(ctx, job);
    case OP_SGD: {
        int first = 0;
        StepState state = start_model_step(ctx, job, job->sgd.momentum != 0.0f ? job->n * sizeof(float) : 0, &first);
        job->sgd.first = first;
        return state;
    }
    case OP_ADAM: return start_adam(ctx, job);
    }
    return STEP_DONE;
}

static const ufloat *gradient(Job *job) {
    size_t len;
    return (const ufloat *)RedisModule_StringPtrLen(job->grad, &len);
}

/* Elements [lo, hi) of the operation. */
static StepState slice(RedisModuleCtx *ctx, Job *job, size_t lo, size_t hi) {
    const size_t bytes = job->n * sizeof(float), count = hi - lo;
    const char *changed = "ERR %s: a key was changed by another command while the operation ran";
    const char *name = OP_NAMES[job->kind];
    switch (job->kind) {
    case OP_ACCUM: {
        ufloat *sum = payload(ctx, job->keys[0], bytes, 0, REDISMODULE_WRITE);
        if (sum == NULL) return fail(job, changed, name);
        axpy(sum + lo, gradient(job) + lo, (float)job->weight, count);
        break;
    }
    case OP_MEAN: {
        ufloat *out = job->key_count == 3 ? payload(ctx, job->keys[MEAN_DST], WIRE_HEADER + bytes, WIRE_HEADER,
                                                    REDISMODULE_WRITE) : (ufloat *)job->mean;
        const ufloat *sum = payload(ctx, job->keys[0], bytes, 0, 0);
        if (sum == NULL || out == NULL) return fail(job, changed, name);
        scaled(out + lo, sum + lo, (float)(1.0 / job->weight), count);
        if (job->mean != NULL && out != (ufloat *)job->mean) memcpy(job->mean + lo, (const char *)(out + lo), count * sizeof(float));
        break;
    }
    case OP_SGD: {
        /* Write access first: it may reallocate a shared value, which would stale a read pointer. */
        ufloat *out = payload(ctx, job->keys[job->reusing ? 3 : 1], WIRE_HEADER + bytes, WIRE_HEADER, REDISMODULE_WRITE);
        ufloat *buf = NULL;
        if (job->sgd.momentum != 0.0f && (buf = payload(ctx, job->keys[2], bytes, 0, REDISMODULE_WRITE)) == NULL)
            return fail(job, changed, name);
        const ufloat *in = payload(ctx, job->keys[0], WIRE_HEADER + bytes, WIRE_HEADER, 0);
        if (in == NULL || out == NULL) return fail(job, changed, name);
        sgd_kernel(out + lo, in + lo, buf ? buf + lo : NULL, gradient(job) + lo, count, job->sgd);
        break;
    }
    case OP_ADAM: {
        ufloat *out = payload(ctx, job->keys[job->reusing ? 3 : 1], WIRE_HEADER + bytes, WIRE_HEADER, REDISMODULE_WRITE);
        ufloat *m = payload(ctx, job->keys[2], ADAM_HEADER + 2 * bytes, ADAM_HEADER, REDISMODULE_WRITE);
        const ufloat *in = payload(ctx, job->keys[0], WIRE_HEADER + bytes, WIRE_HEADER, 0);
        if (in == NULL || out == NULL || m == NULL) return fail(job, changed, name);
        adam_kernel(out + lo, in + lo, m + lo, m + job->n + lo, gradient(job) + lo, count, job->adam);
        break;
    }
    }
    return hi == job->n ? STEP_DONE : STEP_MORE;
}

static void finish(RedisModuleCtx *ctx, Job *job) {
    size_t weight_len;
    const char *weight_text;
    switch (job->kind) {
    case OP_ACCUM:
        weight_text = RedisModule_StringPtrLen(job->weight_text, &weight_len);
        RedisModule_Call(ctx, "HSETNX", "ssb", job->keys[1], job->part, weight_text, weight_len);
        RedisModule_Call(ctx, "HINCRBYFLOAT", "scb", job->keys[1], "~weight", weight_text, weight_len);
        RedisModule_Call(ctx, "HINCRBY", "scc", job->keys[1], "~parts", "1");
        expire_accum(ctx, job);
        break;
    case OP_ADAM: {
        RedisModuleKey *key = RedisModule_OpenKey(ctx, job->keys[2], REDISMODULE_READ | REDISMODULE_WRITE);
        size_t len;
        char *data = RedisModule_StringDMA(key, &len, REDISMODULE_WRITE);
        memcpy(data, "P2PA\0\0\0\0", 8);
        memcpy(data + 8, &job->adam_step, sizeof job->adam_step);
        RedisModule_CloseKey(key);
        __attribute__((fallthrough)); /* both optimizers refresh their keys' TTL */
    }
    case OP_SGD:
        if (job->reusing) RedisModule_Call(ctx, "RENAME", "ss", job->keys[3], job->keys[1]);
        else if (job->key_count == 4) RedisModule_Call(ctx, "DEL", "s", job->keys[3]);
        if (job->ttl_ms > 0) {
            expire(ctx, job->keys[1], job->ttl_ms);
            if (job->kind == OP_ADAM || job->sgd.momentum != 0.0f) expire(ctx, job->keys[2], job->ttl_ms);
        }
        break;
    case OP_MEAN:
        if (job->key_count == 3 && job->ttl_ms > 0) expire(ctx, job->keys[MEAN_DST], job->ttl_ms);
        break;
    }
    job->result = 1;
}

/* The gradient's finiteness, checked in slices too (a 10^7 check alone takes milliseconds). */
static StepState check_slice(Job *job, size_t hi) {
    if (job->grad != NULL && !all_finite(gradient(job) + job->checked, hi - job->checked))
        return fail(job, "%s", "ERR blob has non-finite values");
    job->checked = hi;
    return STEP_MORE;
}

static int allocation_pending(const Job *job) { return job->allocate[0] || job->allocate[1] || job->allocate[2]; }

/* Create one key the operation writes (zero-filled by Redis): each a stretch of its own, as a 40 MB
 * allocation alone takes milliseconds. Nothing was written before the first of these. */
static StepState allocate_next(RedisModuleCtx *ctx, Job *job) {
    int i = job->allocate[0] ? 0 : job->allocate[1] ? 1 : 2;
    size_t len;
    RedisModuleKey *key = open_string(ctx, job->keys[i], REDISMODULE_READ | REDISMODULE_WRITE, &len);
    int ok = key != WRONG_TYPE && len == 0 && RedisModule_StringTruncate(key, job->allocate[i]) == REDISMODULE_OK;
    if (ok && i == job->header_key) memcpy(RedisModule_StringDMA(key, &len, REDISMODULE_WRITE), job->header, WIRE_HEADER);
    if (key != WRONG_TYPE) RedisModule_CloseKey(key);
    if (!ok) return fail(job, "ERR cannot create %s: it was created by another command meanwhile, or no memory", key_name(job, i));
    job->allocate[i] = 0;
    return STEP_MORE;
}

/* Run a job to its end now (small operations, and contexts that cannot block). */
static void run_whole(RedisModuleCtx *ctx, Job *job) {
    if (check_slice(job, job->n) == STEP_DONE || start(ctx, job) == STEP_DONE) return;
    while (allocation_pending(job))
        if (allocate_next(ctx, job) == STEP_DONE) return;
    if (slice(ctx, job, 0, job->n) == STEP_DONE && !job->failed) finish(ctx, job);
}

static int reply(RedisModuleCtx *ctx, Job *job) {
    if (job->failed) return RedisModule_ReplyWithError(ctx, job->error);
    if (job->kind != OP_MEAN) {
        if (job->result == 1) RedisModule_ReplicateVerbatim(ctx);
        return RedisModule_ReplyWithLongLong(ctx, job->result);
    }
    if (job->result == -1) return RedisModule_ReplyWithNull(ctx);
    if (job->key_count == 3) RedisModule_ReplicateVerbatim(ctx); /* MEANSTORE wrote dst */
    RedisModule_ReplyWithArray(ctx, 3);
    if (job->mean != NULL) {
        RedisModule_ReplyWithStringBuffer(ctx, (const char *)job->mean, job->n * sizeof(float));
    } else { /* MEANSTORE run in one piece: the mean is dst's payload, written just now */
        size_t len;
        RedisModuleKey *dst = RedisModule_OpenKey(ctx, job->keys[MEAN_DST], REDISMODULE_READ);
        const char *data = RedisModule_StringDMA(dst, &len, REDISMODULE_READ);
        RedisModule_ReplyWithStringBuffer(ctx, data + WIRE_HEADER, job->n * sizeof(float));
        RedisModule_CloseKey(dst);
    }
    RedisModule_ReplyWithStringBuffer(ctx, job->total_text, job->total_len);
    return RedisModule_ReplyWithLongLong(ctx, job->parts);
}

static void free_job(RedisModuleCtx *ctx, void *data) {
    Job *job = data;
    if (job->async) {
        for (int i = 0; i < job->key_count; i++) RedisModule_FreeString(ctx, job->keys[i]);
        if (job->part) RedisModule_FreeString(ctx, job->part);
        if (job->weight_text) RedisModule_FreeString(ctx, job->weight_text);
        if (job->grad) RedisModule_FreeString(ctx, job->grad);
    }
    if (job->mean && job->mean != scratch) RedisModule_Free(job->mean);
    if (job->async) RedisModule_Free(job);
}

static double clock_ms(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static double now_ms(void) { return clock_ms(CLOCK_MONOTONIC); }

/* P2P.STATS: the longest stretch of CPU time the module held the event loop without yielding (a
 * command, a timer slice, a blocked reply), to tell the module's own pauses from the machine's. */
static double longest_stretch_ms;
static long long stretches;

static double stretch_start(void) { return clock_ms(CLOCK_THREAD_CPUTIME_ID); }

static void stretch_end(double started) {
    double took = clock_ms(CLOCK_THREAD_CPUTIME_ID) - started;
    if (took > longest_stretch_ms) longest_stretch_ms = took;
    stretches++;
}

static int stats_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    if (argc != 1 && argc != 2) return RedisModule_WrongArity(ctx);
    char longest[32];
    snprintf(longest, sizeof longest, "%.3f", longest_stretch_ms);
    RedisModule_ReplyWithArray(ctx, 2);
    RedisModule_ReplyWithStringBuffer(ctx, longest, strlen(longest));
    RedisModule_ReplyWithLongLong(ctx, stretches);
    if (argc == 2) { /* P2P.STATS RESET */
        longest_stretch_ms = 0;
        stretches = 0;
    }
    return REDISMODULE_OK;
}

static int reply_blocked(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    double started = stretch_start();
    RedisModule_AutoMemory(ctx);
    int status = reply(ctx, RedisModule_GetBlockedClientPrivateData(ctx));
    stretch_end(started);
    return status;
}

/* Timer callback: advance the queued jobs for at most SLICE_MS, then yield to the event loop. */
static void drive(RedisModuleCtx *ctx, void *unused) {
    (void)unused;
    double started = stretch_start();
    RedisModule_AutoMemory(ctx);
    timer_armed = 0;
    const double deadline = now_ms() + SLICE_MS;
    while (queue_head != NULL && now_ms() < deadline) {
        Job *job = queue_head;
        RedisModule_SelectDb(ctx, job->db);
        /* Counted in the command's INFO commandstats time, as if it had run in one piece. */
        RedisModule_BlockedClientMeasureTimeStart(job->client);
        StepState state = STEP_MORE;
        while (state == STEP_MORE && job->checked < job->n && now_ms() < deadline)
            state = check_slice(job, job->checked + CHUNK_FLOATS < job->n ? job->checked + CHUNK_FLOATS : job->n);
        if (state == STEP_MORE && job->checked < job->n) {
            RedisModule_BlockedClientMeasureTimeEnd(job->client);
            break;
        }
        if (state == STEP_MORE && !job->started) state = start(ctx, job);
        while (state == STEP_MORE && allocation_pending(job) && now_ms() < deadline) state = allocate_next(ctx, job);
        if (state == STEP_MORE && allocation_pending(job)) {
            RedisModule_BlockedClientMeasureTimeEnd(job->client);
            break;
        }
        while (state == STEP_MORE && now_ms() < deadline) {
            size_t hi = job->done + CHUNK_FLOATS < job->n ? job->done + CHUNK_FLOATS : job->n;
            state = slice(ctx, job, job->done, hi);
            job->done = hi;
            if (state == STEP_DONE && !job->failed) finish(ctx, job);
        }
        RedisModule_BlockedClientMeasureTimeEnd(job->client);
        if (state == STEP_MORE) break;
        queue_head = job->next;
        if (queue_head == NULL) queue_tail = NULL;
        RedisModule_UnblockClient(job->client, job); /* replies and frees through the callbacks */
    }
    if (queue_head != NULL) {
        RedisModule_CreateTimer(ctx, 0, drive, NULL);
        timer_armed = 1;
    }
    stretch_end(started);
}

static int queued_uses(RedisModuleCtx *ctx, Job *job) {
    int db = RedisModule_GetSelectedDb(ctx);
    for (Job *other = queue_head; other != NULL; other = other->next) {
        if (other->db != db) continue;
        for (int i = 0; i < job->key_count; i++)
            for (int j = 0; j < other->key_count; j++)
                if (RedisModule_StringCompare(job->keys[i], other->keys[j]) == 0) return 1;
    }
    return 0;
}

/* Run `job` now or queue it: big operations, and any operation on a key a queued one uses. */
static int submit_now_or_queue(RedisModuleCtx *ctx, Job *job) {
    int busy = queued_uses(ctx, job);
    int flags = RedisModule_GetContextFlags(ctx);
    int can_block = !(flags & (REDISMODULE_CTX_FLAGS_LUA | REDISMODULE_CTX_FLAGS_MULTI |
                               REDISMODULE_CTX_FLAGS_DENY_BLOCKING | REDISMODULE_CTX_FLAGS_REPLICATED |
                               REDISMODULE_CTX_FLAGS_LOADING));
    if (!busy && (job->n < ASYNC_MIN_FLOATS || !can_block)) {
        run_whole(ctx, job);
        int status = reply(ctx, job);
        free_job(ctx, job);
        return status;
    }
    if (!can_block) {
        free_job(ctx, job);
        return RedisModule_ReplyWithError(ctx, "BUSY a P2P operation on this key is in flight; retry outside MULTI/scripts");
    }
    Job *queued = RedisModule_Alloc(sizeof *queued);
    *queued = *job;
    queued->async = 1;
    queued->db = RedisModule_GetSelectedDb(ctx);
    for (int i = 0; i < queued->key_count; i++) RedisModule_RetainString(NULL, queued->keys[i]);
    if (queued->part) RedisModule_RetainString(NULL, queued->part);
    if (queued->weight_text) RedisModule_RetainString(NULL, queued->weight_text);
    if (queued->grad) RedisModule_RetainString(NULL, queued->grad);
    queued->client = RedisModule_BlockClient(ctx, reply_blocked, NULL, free_job, 0);
    if (queue_tail) queue_tail->next = queued;
    else queue_head = queued;
    queue_tail = queued;
    if (!timer_armed) {
        RedisModule_CreateTimer(ctx, 0, drive, NULL);
        timer_armed = 1;
    }
    return REDISMODULE_OK;
}

static int submit(RedisModuleCtx *ctx, Job *job) {
    double started = stretch_start();
    int status = submit_now_or_queue(ctx, job);
    stretch_end(started);
    return status;
}

/* ------------------------------------------------------------------------------------------------
 * Commands: parse and validate every argument, then submit. */

static int parse_double(RedisModuleString *arg, double *out) {
    return RedisModule_StringToDouble(arg, out) == REDISMODULE_OK && isfinite(*out);
}

static int gradient_length(RedisModuleCtx *ctx, Job *job, RedisModuleString *blob) {
    size_t len;
    RedisModule_StringPtrLen(blob, &len);
    if (len == 0 || len % sizeof(float) != 0) {
        RedisModule_ReplyWithError(ctx, "ERR blob length is not a positive multiple of 4 (float32)");
        return 0;
    }
    job->grad = blob; /* its values are checked finite before anything is written */
    job->n = len / sizeof(float);
    return 1;
}

static int parse_ttl(RedisModuleCtx *ctx, RedisModuleString **argv, int argc, int fixed, long long *ttl_ms);

static int accum_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 6 && argc != 8) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);
    Job job = {.kind = OP_ACCUM, .keys = {argv[1], argv[2]}, .key_count = 2, .part = argv[3], .weight_text = argv[4]};
    if (!parse_double(argv[4], &job.weight) || job.weight <= 0)
        return RedisModule_ReplyWithError(ctx, "ERR weight must be a finite positive number");
    if (!parse_ttl(ctx, argv, argc, 6, &job.ttl_ms)) return REDISMODULE_OK;
    if (!gradient_length(ctx, &job, argv[5])) return REDISMODULE_OK;
    return submit(ctx, &job);
}

static int mean_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);
    Job job = {.kind = OP_MEAN, .keys = {argv[1], argv[2]}, .key_count = 2};
    size_t acc_len = 0;
    RedisModuleKey *acc = open_string(ctx, argv[1], REDISMODULE_READ, &acc_len);
    if (acc != WRONG_TYPE) RedisModule_CloseKey(acc);
    job.n = acc_len / sizeof(float); /* decides whether it runs sliced; start() re-reads it */
    return submit(ctx, &job);
}

static int meanstore_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 4 && argc != 6) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);
    Job job = {.kind = OP_MEAN, .keys = {argv[1], argv[2], argv[3]}, .key_count = 3};
    if (RedisModule_StringCompare(argv[3], argv[1]) == 0 || RedisModule_StringCompare(argv[3], argv[2]) == 0)
        return RedisModule_ReplyWithError(ctx, "ERR dst must differ from the accumulator's keys");
    if (!parse_ttl(ctx, argv, argc, 4, &job.ttl_ms)) return REDISMODULE_OK;
    size_t acc_len = 0;
    RedisModuleKey *acc = open_string(ctx, argv[1], REDISMODULE_READ, &acc_len);
    if (acc != WRONG_TYPE) RedisModule_CloseKey(acc);
    job.n = acc_len / sizeof(float); /* decides whether it runs sliced; start() re-reads it */
    return submit(ctx, &job);
}

/* Optional trailing `EX seconds`: the TTL the written keys get (ACCUM: both; SGD/ADAM: the new model
 * version and the state). */
static int parse_ttl(RedisModuleCtx *ctx, RedisModuleString **argv, int argc, int fixed, long long *ttl_ms) {
    *ttl_ms = 0;
    if (argc == fixed) return 1;
    size_t len;
    const char *word = RedisModule_StringPtrLen(argv[fixed], &len);
    long long seconds;
    if (argc != fixed + 2 || len != 2 || (word[0] | 32) != 'e' || (word[1] | 32) != 'x' ||
        RedisModule_StringToLongLong(argv[fixed + 1], &seconds) != REDISMODULE_OK || seconds <= 0 ||
        seconds > 100000000) {
        RedisModule_ReplyWithError(ctx, "ERR expected an optional `EX seconds` (a positive integer) at the end");
        return 0;
    }
    *ttl_ms = seconds * 1000;
    return 1;
}

static int hyper_error(RedisModuleCtx *ctx, const char *name, const char *expected) {
    char message[200];
    snprintf(message, sizeof message, "ERR %s must be %s", name, expected);
    return RedisModule_ReplyWithError(ctx, message);
}

/* A trailing `REUSE old`: taken off the arguments, `old` becomes the job's fourth key; 0 if it names
 * one of the other keys (it is removed: that would lose a model or the state). */
static int take_reuse(RedisModuleString **argv, int *argc, int fixed, Job *job) {
    if (*argc < fixed + 2) return 1;
    size_t len;
    const char *word = RedisModule_StringPtrLen(argv[*argc - 2], &len);
    if (len != 5 || strncasecmp(word, "reuse", 5) != 0) return 1;
    job->keys[3] = argv[*argc - 1];
    *argc -= 2;
    for (int i = 0; i < 3; i++)
        if (RedisModule_StringCompare(job->keys[3], job->keys[i]) == 0) return 0;
    return 1;
}

static int sgd_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 10) return RedisModule_WrongArity(ctx); /* before argv[1..3] are read */
    RedisModule_AutoMemory(ctx);
    Job job = {.kind = OP_SGD, .keys = {argv[1], argv[2], argv[3]}, .key_count = 3};
    if (!take_reuse(argv, &argc, 10, &job)) return RedisModule_ReplyWithError(ctx, "ERR REUSE's key must differ from the others");
    if (argc != 10 && argc != 12) return RedisModule_WrongArity(ctx);
    double lr, momentum, dampening, weight_decay;
    long long nesterov;
    if (!parse_double(argv[5], &lr) || lr < 0) return hyper_error(ctx, "lr", "a finite number >= 0");
    if (!parse_double(argv[6], &momentum) || momentum < 0) return hyper_error(ctx, "momentum", "a finite number >= 0");
    if (!parse_double(argv[7], &dampening) || dampening < 0 || dampening > 1)
        return hyper_error(ctx, "dampening", "a number in [0, 1]");
    if (!parse_double(argv[8], &weight_decay) || weight_decay < 0)
        return hyper_error(ctx, "weight_decay", "a finite number >= 0");
    if (RedisModule_StringToLongLong(argv[9], &nesterov) != REDISMODULE_OK || (nesterov != 0 && nesterov != 1))
        return hyper_error(ctx, "nesterov", "0 or 1");
    if (nesterov && (momentum <= 0 || dampening != 0))
        return hyper_error(ctx, "nesterov", "0 unless momentum > 0 and dampening = 0 (as in torch)");
    if (!parse_ttl(ctx, argv, argc, 10, &job.ttl_ms)) return REDISMODULE_OK;
    if (momentum != 0 && (RedisModule_StringCompare(argv[3], argv[1]) == 0 || RedisModule_StringCompare(argv[3], argv[2]) == 0))
        return RedisModule_ReplyWithError(ctx, "ERR the momentum buffer key must differ from the model keys");
    if (!gradient_length(ctx, &job, argv[4])) return REDISMODULE_OK;
    job.sgd = (SgdParams){(float)lr, (float)momentum, (float)dampening, (float)weight_decay, (int)nesterov, 0};
    if (momentum == 0) job.key_count = 2; /* the buffer key is not used */
    if (job.keys[3] != NULL) job.key_count = 4;
    return submit(ctx, &job);
}

static int adam_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 11) return RedisModule_WrongArity(ctx); /* before argv[1..3] are read */
    RedisModule_AutoMemory(ctx);
    Job job = {.kind = OP_ADAM, .keys = {argv[1], argv[2], argv[3]}, .key_count = 3};
    if (!take_reuse(argv, &argc, 11, &job)) return RedisModule_ReplyWithError(ctx, "ERR REUSE's key must differ from the others");
    if (argc != 11 && argc != 13) return RedisModule_WrongArity(ctx);
    double lr, beta1, beta2, eps, weight_decay;
    long long decoupled;
    if (!parse_double(argv[5], &lr) || lr < 0) return hyper_error(ctx, "lr", "a finite number >= 0");
    if (!parse_double(argv[6], &beta1) || beta1 < 0 || beta1 >= 1) return hyper_error(ctx, "beta1", "in [0, 1)");
    if (!parse_double(argv[7], &beta2) || beta2 < 0 || beta2 >= 1) return hyper_error(ctx, "beta2", "in [0, 1)");
    if (!parse_double(argv[8], &eps) || eps <= 0) return hyper_error(ctx, "eps", "a finite number > 0");
    if (!parse_double(argv[9], &weight_decay) || weight_decay < 0)
        return hyper_error(ctx, "weight_decay", "a finite number >= 0");
    if (RedisModule_StringToLongLong(argv[10], &decoupled) != REDISMODULE_OK || (decoupled != 0 && decoupled != 1))
        return hyper_error(ctx, "decoupled", "0 (Adam) or 1 (AdamW)");
    if (!parse_ttl(ctx, argv, argc, 11, &job.ttl_ms)) return REDISMODULE_OK;
    if (RedisModule_StringCompare(argv[3], argv[1]) == 0 || RedisModule_StringCompare(argv[3], argv[2]) == 0)
        return RedisModule_ReplyWithError(ctx, "ERR the optimizer state key must differ from the model keys");
    if (!gradient_length(ctx, &job, argv[4])) return REDISMODULE_OK;
    job.adam = (AdamParams){(float)lr, (float)beta1, (float)beta2, (float)eps, (float)weight_decay, 0, 0, (int)decoupled};
    if (job.keys[3] != NULL) job.key_count = 4;
    return submit(ctx, &job);
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    if (RedisModule_Init(ctx, "p2ptrain", 3, REDISMODULE_APIVER_1) == REDISMODULE_ERR) return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "p2p.accum", accum_command, "write deny-oom", 1, 2, 1) == REDISMODULE_ERR ||
        RedisModule_CreateCommand(ctx, "p2p.mean", mean_command, "readonly", 1, 2, 1) == REDISMODULE_ERR ||
        RedisModule_CreateCommand(ctx, "p2p.meanstore", meanstore_command, "write deny-oom", 1, 3, 1) == REDISMODULE_ERR ||
        RedisModule_CreateCommand(ctx, "p2p.sgd", sgd_command, "write deny-oom", 1, 3, 1) == REDISMODULE_ERR ||
        RedisModule_CreateCommand(ctx, "p2p.adam", adam_command, "write deny-oom", 1, 3, 1) == REDISMODULE_ERR ||
        RedisModule_CreateCommand(ctx, "p2p.stats", stats_command, "readonly fast", 0, 0, 0) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    return REDISMODULE_OK;
}
