// tokenizer.model through libsentencepiece, for checkpoints without tokenizer.json. Control pieces
// (<s>, </s>, ...) written in the text become those tokens, as in the Hugging Face slow tokenizer; BOS/EOS
// follow tokenizer_config.json's add_bos_token/add_eos_token (defaults: BOS yes, EOS no, Llama's).
#include "moex/tokenizer/tokenizer_impl.h"

#ifdef MOEX_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>

#include "moex/tokenizer/added_vocab.h"
#endif

#include "moex/core/error.h"

namespace moex::tok {

#ifdef MOEX_HAVE_SENTENCEPIECE
namespace {

class SentencePieceTokenizer final : public Tokenizer::Impl {
 public:
  explicit SentencePieceTokenizer(const std::filesystem::path& path) {
    const auto status = sp_.Load(path.string());
    if (!status.ok()) throw FormatError(fmt::format("{}: not a SentencePiece model: {}", path.string(), status.ToString()));
    for (int id = 0; id < sp_.GetPieceSize(); ++id) {
      if (!sp_.IsControl(id)) continue;
      const std::string piece = sp_.IdToPiece(id);
      if (!piece.empty()) controls_.push_back({piece, id, false, false, false, false, sp_.IsControl(id)});
    }
    std::vector<const AddedToken*> ptrs;
    for (const auto& t : controls_) ptrs.push_back(&t);
    matcher_.build(std::move(ptrs));
    if (sp_.bos_id() >= 0) {
      bos_id = sp_.bos_id();
      bos_token = sp_.IdToPiece(sp_.bos_id());
    }
    if (sp_.eos_id() >= 0) {
      eos_id = sp_.eos_id();
      eos_token = sp_.IdToPiece(sp_.eos_id());
    }
  }

  void encode(std::string_view text, bool add_special_tokens, std::vector<int32_t>& out) const override {
    check_utf8(text);
    if (add_special_tokens && add_bos && bos_id) out.push_back(*bos_id);
    std::vector<Segment> segments;
    matcher_.split(text, segments);
    std::vector<int> ids;
    for (const Segment& seg : segments) {
      if (seg.id >= 0) {
        out.push_back(seg.id);
        continue;
      }
      ids.clear();
      const auto status = sp_.Encode(text.substr(seg.begin, seg.end - seg.begin), &ids);
      if (!status.ok()) throw Error(fmt::format("sentencepiece encode failed: {}", status.ToString()));
      out.insert(out.end(), ids.begin(), ids.end());
    }
    if (add_special_tokens && add_eos && eos_id) out.push_back(*eos_id);
  }

  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const override {
    std::vector<int> kept;
    for (int32_t id : ids) {
      if (id < 0 || id >= sp_.GetPieceSize())
        throw UsageError(fmt::format("token id {} is not in the vocabulary (valid ids: 0..{})", id, sp_.GetPieceSize() - 1));
      if (!(skip_special_tokens && sp_.IsControl(id))) kept.push_back(id);
    }
    std::string text;
    const auto status = sp_.Decode(kept, &text);
    if (!status.ok()) throw Error(fmt::format("sentencepiece decode failed: {}", status.ToString()));
    return text;
  }

  int32_t vocab_size() const override { return sp_.GetPieceSize(); }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    const int id = sp_.PieceToId(token);
    if (id == sp_.unk_id() && sp_.IdToPiece(id) != token) return std::nullopt;
    return id;
  }
  std::optional<std::string> id_to_token(int32_t id) const override {
    if (id < 0 || id >= sp_.GetPieceSize()) return std::nullopt;
    return sp_.IdToPiece(id);
  }
  bool is_special(int32_t id) const override { return id >= 0 && id < sp_.GetPieceSize() && sp_.IsControl(id); }

 private:
  sentencepiece::SentencePieceProcessor sp_;
  std::vector<AddedToken> controls_;
  AddedMatcher matcher_;
};

}  // namespace

std::unique_ptr<Tokenizer::Impl> make_sentencepiece_tokenizer(const std::filesystem::path& model_path) {
  return std::make_unique<SentencePieceTokenizer>(model_path);
}
#else
std::unique_ptr<Tokenizer::Impl> make_sentencepiece_tokenizer(const std::filesystem::path& model_path) {
  throw FormatError(fmt::format("{}: this moex build has no SentencePiece support (libsentencepiece was not found "
                                "at configure time); provide tokenizer.json instead", model_path.string()));
}
#endif

}  // namespace moex::tok
