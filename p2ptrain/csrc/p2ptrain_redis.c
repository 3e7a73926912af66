/*
 * p2ptrain Redis module: gradients summed and averaged inside Redis at memory speed.
 *
 *   P2P.ACCUM acc meta part weight blob   -> 1 added, 0 if `part` was already added
 *       acc += weight * blob (raw little-endian float32), once per part id; meta (a hash) records
 *       each part's weight plus the running totals `~weight` and `~parts`.
 *   P2P.MEAN acc meta                     -> [acc / ~weight as float32 bytes, ~weight, ~parts] or nil
 *
 * Every argument is validated before anything is written, so a bad call (wrong length, NaN, bad
 * weight) leaves the accumulator untouched. Both commands are single atomic Redis commands; ACCUM
 * is replicated verbatim (it is deterministic).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redismodule_min.h"

/* Redis strings carry no alignment guarantee: access floats through an unaligned type. */
typedef float __attribute__((aligned(1))) unaligned_float;

static int all_finite(const unaligned_float *values, size_t n) {
    int finite = 1;
    for (size_t i = 0; i < n; i++) finite &= isfinite(values[i]);
    return finite;
}

static int key_is(RedisModuleKey *key, int type) {
    int actual = RedisModule_KeyType(key);
    return actual == REDISMODULE_KEYTYPE_EMPTY || actual == type;
}

static int accum_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 6) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);

    double weight;
    if (RedisModule_StringToDouble(argv[4], &weight) != REDISMODULE_OK || !isfinite(weight) || weight <= 0)
        return RedisModule_ReplyWithError(ctx, "ERR weight must be a finite positive number");
    size_t blob_len;
    const char *blob = RedisModule_StringPtrLen(argv[5], &blob_len);
    if (blob_len % sizeof(float) != 0)
        return RedisModule_ReplyWithError(ctx, "ERR blob length is not a multiple of 4 (float32)");
    size_t n = blob_len / sizeof(float);
    const unaligned_float *gradient = (const unaligned_float *)blob;
    if (!all_finite(gradient, n)) return RedisModule_ReplyWithError(ctx, "ERR blob has non-finite values");

    RedisModuleKey *acc = RedisModule_OpenKey(ctx, argv[1], REDISMODULE_READ | REDISMODULE_WRITE);
    RedisModuleKey *meta = RedisModule_OpenKey(ctx, argv[2], REDISMODULE_READ);
    if (!key_is(acc, REDISMODULE_KEYTYPE_STRING) || !key_is(meta, REDISMODULE_KEYTYPE_HASH))
        return RedisModule_ReplyWithError(ctx, REDISMODULE_ERRORMSG_WRONGTYPE);
    int fresh = RedisModule_KeyType(acc) == REDISMODULE_KEYTYPE_EMPTY;
    if (!fresh && RedisModule_ValueLength(acc) != blob_len) {
        char message[160];
        snprintf(message, sizeof message, "ERR shape mismatch: accumulator has %zu floats, got %zu",
                 RedisModule_ValueLength(acc) / sizeof(float), n);
        return RedisModule_ReplyWithError(ctx, message);
    }

    /* Idempotence: the part id is claimed first; a retried micro-batch changes nothing. */
    size_t weight_len;
    const char *weight_text = RedisModule_StringPtrLen(argv[4], &weight_len);
    RedisModuleCallReply *claimed = RedisModule_Call(ctx, "HSETNX", "ssb", argv[2], argv[3], weight_text, weight_len);
    if (RedisModule_CallReplyType(claimed) != REDISMODULE_REPLY_INTEGER)
        return RedisModule_ReplyWithError(ctx, "ERR cannot record the part in the meta hash");
    if (RedisModule_CallReplyInteger(claimed) == 0) return RedisModule_ReplyWithLongLong(ctx, 0);

    if (fresh && RedisModule_StringTruncate(acc, blob_len) != REDISMODULE_OK)
        return RedisModule_ReplyWithError(ctx, "ERR cannot allocate the accumulator");
    size_t acc_len;
    unaligned_float *sum = (unaligned_float *)RedisModule_StringDMA(acc, &acc_len, REDISMODULE_WRITE);
    const float w = (float)weight;
    for (size_t i = 0; i < n; i++) sum[i] += w * gradient[i]; /* vectorised by the compiler */

    RedisModule_Call(ctx, "HINCRBYFLOAT", "scb", argv[2], "~weight", weight_text, weight_len);
    RedisModule_Call(ctx, "HINCRBY", "scc", argv[2], "~parts", "1");
    RedisModule_ReplicateVerbatim(ctx);
    return RedisModule_ReplyWithLongLong(ctx, 1);
}

static int mean_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return RedisModule_WrongArity(ctx);
    RedisModule_AutoMemory(ctx);
    RedisModuleKey *acc = RedisModule_OpenKey(ctx, argv[1], REDISMODULE_READ);
    if (RedisModule_KeyType(acc) == REDISMODULE_KEYTYPE_EMPTY) return RedisModule_ReplyWithNull(ctx);
    if (RedisModule_KeyType(acc) != REDISMODULE_KEYTYPE_STRING)
        return RedisModule_ReplyWithError(ctx, REDISMODULE_ERRORMSG_WRONGTYPE);

    RedisModuleCallReply *totals = RedisModule_Call(ctx, "HMGET", "scc", argv[2], "~weight", "~parts");
    if (RedisModule_CallReplyType(totals) != REDISMODULE_REPLY_ARRAY || RedisModule_CallReplyLength(totals) != 2)
        return RedisModule_ReplyWithError(ctx, "ERR cannot read the accumulator's meta hash");
    size_t weight_len, parts_len;
    const char *weight_text = RedisModule_CallReplyStringPtr(RedisModule_CallReplyArrayElement(totals, 0), &weight_len);
    const char *parts_text = RedisModule_CallReplyStringPtr(RedisModule_CallReplyArrayElement(totals, 1), &parts_len);
    if (weight_text == NULL || parts_text == NULL || weight_len == 0 || weight_len > 63 || parts_len > 20)
        return RedisModule_ReplyWithError(ctx, "ERR accumulator has no recorded weight");
    char buffer[64];
    memcpy(buffer, weight_text, weight_len);
    buffer[weight_len] = '\0';
    double total = strtod(buffer, NULL);
    memcpy(buffer, parts_text, parts_len);
    buffer[parts_len] = '\0';
    long long parts = strtoll(buffer, NULL, 10);
    if (!(total > 0)) return RedisModule_ReplyWithError(ctx, "ERR accumulator has no recorded weight");

    size_t len;
    const unaligned_float *sum = (const unaligned_float *)RedisModule_StringDMA(acc, &len, REDISMODULE_READ);
    size_t n = len / sizeof(float);
    float *mean = RedisModule_Alloc(len ? len : 1);
    const float scale = (float)(1.0 / total);
    for (size_t i = 0; i < n; i++) mean[i] = sum[i] * scale;
    RedisModule_ReplyWithArray(ctx, 3);
    RedisModule_ReplyWithStringBuffer(ctx, (const char *)mean, len);
    RedisModule_ReplyWithStringBuffer(ctx, weight_text, weight_len);
    RedisModule_ReplyWithLongLong(ctx, parts);
    RedisModule_Free(mean);
    return REDISMODULE_OK;
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    if (RedisModule_Init(ctx, "p2ptrain", 1, REDISMODULE_APIVER_1) == REDISMODULE_ERR) return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "p2p.accum", accum_command, "write deny-oom", 1, 2, 1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    if (RedisModule_CreateCommand(ctx, "p2p.mean", mean_command, "readonly", 1, 2, 1) == REDISMODULE_ERR)
        return REDISMODULE_ERR;
    return REDISMODULE_OK;
}
