// Minimal TensorFlow Lite Micro runner for a model exported by
// `python tflite/export.py --preset=micro ...`.
//
// The generated header (<task>_micro_model_data.h) gives the model array and
// everything this file needs: KM_MODEL_DATA, KM_MODEL_ARENA_BYTES (measured
// with the TFLM interpreter, plus a margin), KM_MODEL_OP_COUNT and
// KM_MODEL_REGISTER_OPS(resolver), which registers exactly the model's ops,
// and the input/output quantization (KM_MODEL_INPUT_SCALE, ...).
//
// Build: see tflite/micro/Makefile and tflite/DEPLOY.md. Pass the header with
//   -DKM_MODEL_HEADER='"task1_micro_model_data.h"'

#include <cstddef>
#include <cstdint>

#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

#ifndef KM_MODEL_HEADER
#error "Define KM_MODEL_HEADER, e.g. -DKM_MODEL_HEADER='\"task_model_data.h\"'"
#endif
#include KM_MODEL_HEADER

namespace {

// TFLM needs a 16-byte aligned arena; a real firmware may place it in a
// dedicated RAM section.
alignas(16) uint8_t tensor_arena[KM_MODEL_ARENA_BYTES];

// Replace with the application's input: a camera frame resized to the model
// input and quantized as q = round(x / KM_MODEL_INPUT_SCALE) +
// KM_MODEL_INPUT_ZERO_POINT, with x preprocessed exactly as in training.
void FillInput(TfLiteTensor* input) {
  for (size_t i = 0; i < input->bytes; ++i) {
    input->data.uint8[i] = static_cast<uint8_t>(i * 31u);
  }
}

// Index of the largest output score (int8 or uint8 output).
int ArgMax(const TfLiteTensor* output, int num_classes) {
  int best = 0;
  for (int i = 1; i < num_classes; ++i) {
    const int value = output->type == kTfLiteInt8 ? output->data.int8[i]
                                                  : output->data.uint8[i];
    const int best_value = output->type == kTfLiteInt8
                               ? output->data.int8[best]
                               : output->data.uint8[best];
    if (value > best_value) best = i;
  }
  return best;
}

}  // namespace

int main() {
  tflite::InitializeTarget();

  const tflite::Model* model = tflite::GetModel(KM_MODEL_DATA);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    MicroPrintf("Model schema %d != supported %d.",
                static_cast<int>(model->version()), TFLITE_SCHEMA_VERSION);
    return 1;
  }

  static tflite::MicroMutableOpResolver<KM_MODEL_OP_COUNT> resolver;
  KM_MODEL_REGISTER_OPS(resolver);

  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena,
                                              sizeof(tensor_arena));
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    MicroPrintf("AllocateTensors failed: is KM_MODEL_ARENA_BYTES (%d) too "
                "small for this target?", KM_MODEL_ARENA_BYTES);
    return 1;
  }
  MicroPrintf("Arena used: %d of %d bytes.",
              static_cast<int>(interpreter.arena_used_bytes()),
              KM_MODEL_ARENA_BYTES);

  TfLiteTensor* input = interpreter.input(0);
  FillInput(input);
  if (interpreter.Invoke() != kTfLiteOk) {
    MicroPrintf("Invoke failed.");
    return 1;
  }

  const TfLiteTensor* output = interpreter.output(0);
  const int num_classes = output->dims->data[output->dims->size - 1];
  const int best = ArgMax(output, num_classes);
  const int raw = output->type == kTfLiteInt8 ? output->data.int8[best]
                                              : output->data.uint8[best];
  MicroPrintf("Predicted class %d (score %f).", best,
              static_cast<double>((raw - KM_MODEL_OUTPUT_ZERO_POINT) *
                                  KM_MODEL_OUTPUT_SCALE));
  return 0;
}
