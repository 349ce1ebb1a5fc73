// Factories of the built-in predictors; registry.cc lists them by name.
#pragma once

#include "moex/moe/predictor/expert_predictor.h"

namespace moex {

std::unique_ptr<ExpertPredictor> make_frequency_predictor(const PredictorOptions& options);
std::unique_ptr<ExpertPredictor> make_stride_predictor(const PredictorOptions& options);
std::unique_ptr<ExpertPredictor> make_affinity_predictor(const PredictorOptions& options);
std::unique_ptr<ExpertPredictor> make_eam_predictor(const PredictorOptions& options);
std::unique_ptr<ExpertPredictor> make_bayes_predictor(const PredictorOptions& options);
std::unique_ptr<ExpertPredictor> make_pregate_predictor(const PredictorOptions& options);

// Validates options shared by every predictor (throws UsageError).
void check_predictor_options(std::string_view name, const PredictorOptions& options);

}  // namespace moex
