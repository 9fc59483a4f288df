// Rewrites a GGUF model with every tensor in f32 (dequantizing quantized weights).
//
// Why: with quantized weights, ggml's CPU matmul quantizes its activations (q8) before every product. A change
// of one ulp in an attention output can then flip a rounding and grow through the layers, so two attention
// implementations that agree to 1e-7 give perplexities a percent apart over a few tokens. With f32 weights the
// whole forward pass is f32 and the harness measures the attention method, not that rounding noise.
// The f32 model computes the same function as the quantized one up to those activation roundings.
#include "llama.h"

#include <cstdio>

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s IN.gguf OUT.gguf\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    llama_model_quantize_params qp = llama_model_quantize_default_params();
    qp.ftype = LLAMA_FTYPE_ALL_F32;
    qp.allow_requantize = true;
    qp.quantize_output_tensor = true;
    qp.pure = true;
    qp.nthread = 2;
    const uint32_t rc = llama_model_quantize(argv[1], argv[2], &qp);
    llama_backend_free();
    if (rc != 0) {
        std::fprintf(stderr, "conversion failed (%u)\n", rc);
        return 1;
    }
    return 0;
}
